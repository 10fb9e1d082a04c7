"""Streaming SFT with 2 CPU ranks (DP2) for one epoch; rank 0 writes the questions each rank
trained on, one list per rank ("" for a filler sample), to ``--out``.

    python tests/scripts/sft_streaming.py --data d.jsonl --tokenizer TOK --out seen.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from transformers import AutoTokenizer

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.data.sft_datamodule import SFTDataModule


class Record(L.Callback):
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.questions = tokenizer, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            text = self.tokenizer.decode(ids[: int((labels != -100).nonzero().min())] if (labels != -100).any() else [])
            self.questions.append(text.split("user\n")[-1].split("<|im_end|>")[0] if text else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data = SFTDataModule([args.data], tokenizer, max_length=48, truncation="drop", batch_size=1, streaming=True)
    config = GPTConfig.preset(
        "qwen2", vocab_size=len(tokenizer), num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64
    )
    record = Record(tokenizer)
    trainer = L.Trainer(
        strategy=MegatronStrategy(start_method="popen"),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[record],
        limit_val_batches=0,
    )
    trainer.fit(GPTModule(config), datamodule=data)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(record.questions))
    torch.distributed.barrier()
    if rank == 0:
        seen = {str(r): json.loads(Path(f"{args.out}.rank{r}").read_text()) for r in range(2)}
        Path(args.out).write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
