"""Train a tiny model on a Megatron blend with 2 CPU ranks (DP2), then resume from step 2.

Writes ``--out`` (from rank 0) with Megatron's training rows built in one process, each rank's
batches, the losses, and each rank's batches after resuming.

    python tests/scripts/pretrain_indexed.py --tokenizer TOK --out r.json --blend 0.7 a 0.3 b
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.data.indexed import build_megatron_datasets, split_sizes
from lightning_megatron.data.pretrain import PretrainDataModule

SEQ, BATCH, STEPS, SPLIT, SEED = 16, 2, 4, "90,10,0", 3


class Record(L.Callback):
    def __init__(self) -> None:
        self.batches, self.losses = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["input_ids"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(args, tokenizer, ckpt_dir: Path, resume: bool) -> Record:
    data = PretrainDataModule(
        args.blend,
        tokenizer,
        seq_length=SEQ,
        batch_size=BATCH,
        split=SPLIT,
        seed=SEED,
        path_to_cache=Path(args.out).parent / "cache",
    )
    config = GPTConfig.preset(
        "qwen2",
        vocab_size=len(tokenizer),
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
    )
    record = Record()
    callbacks = [record]
    if not resume:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        strategy=MegatronStrategy(start_method="popen"),
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
    )
    module = GPTModule(config, lr=5e-3, warmup_steps=0, lr_decay="constant")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_dir / "epoch=0-step=2.ckpt" if resume else None)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--blend", nargs="+", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as cache:  # this process's own cache: ranks build it at once
        train, *_ = build_megatron_datasets(
            args.blend,
            SEQ,
            tokenizer.eos_token_id,
            split=SPLIT,
            num_samples=split_sizes(SPLIT, STEPS * BATCH * 2),
            seed=SEED,
            path_to_cache=cache,
        )
        expected = [train[i]["input_ids"].tolist() for i in range(len(train))]
    ckpt_dir = Path(args.out).parent / "ckpt"
    first = fit(args, tokenizer, ckpt_dir, resume=False)
    resumed = fit(args, tokenizer, ckpt_dir, resume=True)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    mine = {"batches": first.batches, "loss": first.losses, "resumed": resumed.batches}
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(mine))
    torch.distributed.barrier()
    if rank == 0:
        ranks = [json.loads(Path(f"{args.out}.rank{r}").read_text()) for r in range(2)]
        result = {
            "expected": expected,
            "batches": {str(r): ranks[r]["batches"] for r in range(2)},
            "resumed": {str(r): ranks[r]["resumed"] for r in range(2)},
            "loss": ranks[0]["loss"],
        }
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
