"""Import Hugging Face models under several layouts and record Megatron's logits (rank 0 writes).

    python tests/scripts/hf_layouts.py --devices 2 --models llama=DIR ... --layouts tp2 pp2 --out r.json

With --train-save DIR, the first model also trains 2 steps under the first layout, checkpointing
into DIR, and records the trained model's loss on a fixed batch (for export checks).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_megatron import GPTModule, MegatronStrategy  # noqa: E402
from tests.scripts.train_layouts import parse_layout  # noqa: E402

BATCH = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(7))


def loader() -> DataLoader:
    return DataLoader([{"input_ids": row, "labels": row} for row in BATCH], batch_size=4)


def trainer(layout: str, devices: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=MegatronStrategy(**parse_layout(layout, devices)),
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="family=HF_DIR")
    parser.add_argument("--layouts", nargs="+", required=True)
    parser.add_argument("--train-save")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results: dict = {}
    for entry in args.models:
        family, directory = entry.split("=", 1)
        for layout in args.layouts:
            module = GPTModule.from_hf(directory)
            logits = trainer(layout, args.devices).predict(module, loader())[0]
            # Sample 0 is on data-parallel rank 0 in every layout.
            results[f"{family}/{layout}"] = logits[0, :, :250].tolist()
    if args.train_save:
        family, directory = args.models[0].split("=", 1)
        module = GPTModule.from_hf(directory, lr=1e-2, lr_decay="constant")
        save = ModelCheckpoint(dirpath=args.train_save, every_n_train_steps=2)
        trainer(args.layouts[0], args.devices, max_steps=2, callbacks=[save], limit_val_batches=0).fit(module, loader())
        metrics = trainer(args.layouts[0], args.devices).validate(module, loader())
        results["trained_val_loss"] = metrics[0]["val/loss"]
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
