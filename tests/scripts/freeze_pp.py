"""Freeze under PP2: names carry global layer numbers on every stage. Each rank writes which of
its (global) parameter names changed during 3 steps.

    python tests/scripts/freeze_pp.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy  # noqa: E402
from lightning_megatron.callbacks import Freeze  # noqa: E402
from lightning_megatron.callbacks.freeze import _global_names  # noqa: E402
from tests.scripts.train_layouts import MODELS  # noqa: E402
from tests.test_training import loader  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    values = dict(MODELS["dense"])
    config = GPTConfig.preset(values.pop("family"), vocab_size=257, **values)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            before.update({n: p.detach().clone() for n, p in _global_names(trainer.strategy._bare_chunks)})

    model = GPTModule(config, lr=1e-2)
    trainer = L.Trainer(
        strategy=MegatronStrategy(pp=2, micro_batch_size=2),
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[Freeze(parameters=["decoder.layers.3.", "embedding"]), Snapshot()],
    )
    trainer.fit(model, loader())
    after = dict(_global_names(model.chunks))
    changed = sorted(n for n in before if not torch.equal(before[n], after[n].detach()))
    Path(sys.argv[1], f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"names": sorted(before), "changed": changed})
    )


if __name__ == "__main__":
    main()
