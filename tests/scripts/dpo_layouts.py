"""DPO on a Hugging Face model with LoRA as the reference, under one layout, for each loss type.

    python tests/scripts/dpo_layouts.py --hf DIR --devices 2 --layout tp2 --loss-types sigmoid --out OUT

Per loss type, OUT/<loss_type>/ gets ``init/`` and ``grads/`` adapter checkpoints (the initial
adapters, and the first step's adapter gradients in their place: see lora_layouts.py) and
``result.pt`` (rank 0) with every step's logged metrics.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_megatron import GPTModule, MegatronStrategy  # noqa: E402
from lightning_megatron.callbacks import DPO, LoRA  # noqa: E402
from tests.scripts.lora_layouts import Record  # noqa: E402
from tests.scripts.train_layouts import parse_layout  # noqa: E402

OPTIONS = {
    "sigmoid": dict(beta=0.1, label_smoothing=0.1),
    "hinge": dict(beta=0.5),
    "ipo": dict(beta=0.5),
    "robust": dict(beta=0.1, label_smoothing=0.2, rpo_alpha=0.5),
}


def preference_pairs(pairs: int = 4, seed: int = 11) -> dict[str, torch.Tensor]:
    """Pairs padded to one length, as PreferenceDataModule collates them: a shared prompt of
    5-7 tokens, answers of different lengths, labels only on the answers, padding masked."""
    g = torch.Generator().manual_seed(seed)
    length = 16
    batch = {f"{side}_{k}": [] for side in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    for _ in range(pairs):
        prompt = torch.randint(1, 250, (int(torch.randint(5, 8, (1,), generator=g)),), generator=g)
        for side in ("chosen", "rejected"):
            answer = torch.randint(1, 250, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            ids = torch.cat([prompt, answer])
            pad = length - ids.numel()
            batch[f"{side}_input_ids"].append(torch.cat([ids, torch.zeros(pad, dtype=torch.long)]))
            labels = torch.cat([torch.full_like(prompt, -100), answer, torch.full((pad,), -100)])
            batch[f"{side}_labels"].append(labels)
            batch[f"{side}_attention_mask"].append((torch.arange(length) < ids.numel()).long())
    return {k: torch.stack(v) for k, v in batch.items()}


def loader() -> DataLoader:
    pairs = preference_pairs()
    rows = [{k: v[i] for k, v in pairs.items()} for i in range(pairs["chosen_input_ids"].shape[0])]
    return DataLoader(rows, batch_size=len(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--layout", required=True)
    parser.add_argument("--loss-types", nargs="+", default=list(OPTIONS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for loss_type in args.loss_types:
        out = Path(args.out) / loss_type
        record = Record(out)
        trainer = L.Trainer(
            strategy=MegatronStrategy(**{**parse_layout(args.layout, args.devices), "micro_batch_size": 2}),
            accelerator="cpu",
            devices=args.devices,
            max_steps=args.steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            callbacks=[
                LoRA(r=4, alpha=8, init="random", seed=5),
                DPO(loss_type=loss_type, **OPTIONS[loss_type]),
                record,
            ],
        )
        module = GPTModule.from_hf(args.hf, lr=1e-2, lr_decay="constant", weight_decay=0.0)
        trainer.fit(module, loader())
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            torch.save({"metrics": record.metrics}, out / "result.pt")


if __name__ == "__main__":
    main()
