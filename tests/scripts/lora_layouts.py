"""LoRA on a Hugging Face model under one layout: what the peft comparison and resume tests need.

    python tests/scripts/lora_layouts.py --hf DIR --devices 2 --layout tp2 --out OUT

Writes into OUT (rank 0 for files, every rank for checkpoints):
- ``init/``: an adapter checkpoint of the initial adapters (random A and B), saved before step 1;
- ``grads/``: the same checkpoint format holding the first step's adapter *gradients* in place of
  the adapters (Megatron's sharded checkpoint assembles them from every rank, so the test can
  compare them with peft's gradients through ``export_peft``);
- ``steps/``: adapter checkpoints every 2 steps (``step=4`` holds the trained adapters);
- ``result.pt``: initial logits, per-step losses, trained logits before and after ``merge_lora``,
  and with ``--resume``, the losses of a second run resumed from the step-2 checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_megatron import GPTModule, MegatronStrategy  # noqa: E402
from lightning_megatron.callbacks import LoRA  # noqa: E402
from lightning_megatron.lora import lora_layers, merge_lora  # noqa: E402
from tests.scripts.train_layouts import parse_layout  # noqa: E402

BATCH = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(3))


def loader() -> DataLoader:
    return DataLoader([{"input_ids": row, "labels": row} for row in BATCH], batch_size=4)


class Record(L.Callback):
    """Losses per step; at the first step, the initial adapters and their gradients as checkpoints."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.losses, self.metrics = out, [], []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if self.out is None or trainer.global_step != 0:
            return
        trainer.save_checkpoint(self.out / "init", weights_only=True)
        layers = lora_layers(trainer.strategy._checkpoint_chunks().values())
        params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        kept = [p.data for p in params]
        for p in params:
            p.data = p.main_grad.to(p.dtype)
        trainer.save_checkpoint(self.out / "grads", weights_only=True)
        for p, data in zip(params, kept, strict=True):
            p.data = data

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.losses.append(metrics["train/loss"])
        self.metrics.append(metrics)


def make_trainer(args, callbacks=(), **kwargs) -> L.Trainer:
    layout = parse_layout(args.layout, args.devices)
    return L.Trainer(
        strategy=MegatronStrategy(**layout),
        accelerator="cpu",
        devices=args.devices,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def lora() -> LoRA:
    return LoRA(r=4, alpha=8, init="random", target_modules="all-linear", seed=5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--layout", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="also resume from the step-2 checkpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    result = {}

    module = GPTModule.from_hf(args.hf, lr=1e-2, lr_decay="constant", weight_decay=0.0)
    result["init_logits"] = make_trainer(args, [lora()]).predict(module, loader())[0]

    record = Record(out)
    save = ModelCheckpoint(dirpath=out / "steps", every_n_train_steps=2, save_top_k=-1)
    make_trainer(args, [lora(), record, save], max_steps=args.steps).fit(module, loader())
    result["losses"] = record.losses
    result["trained_logits"] = make_trainer(args, [lora()]).predict(module, loader())[0]
    merged = merge_lora(module.chunks)
    result["merged_count"] = merged
    result["merged_logits"] = make_trainer(args).predict(module, loader())[0]

    if args.resume:
        resumed = Record(None)
        again = GPTModule.from_hf(args.hf, lr=1e-2, lr_decay="constant", weight_decay=0.0)
        step2 = next(p for p in (out / "steps").iterdir() if "step=2" in p.name)
        make_trainer(args, [lora(), resumed], max_steps=args.steps).fit(again, loader(), ckpt_path=step2)
        result["resumed_losses"] = resumed.losses
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save(result, out / "result.pt")


if __name__ == "__main__":
    main()
