"""SFT demo: teach a small model who it is, with tensor parallelism (TP=2), then ask it via transformers.

1. trains a BPE tokenizer with a ChatML template on the bundled corpus (nothing is downloaded);
2. fine-tunes a small Qwen2-style model from scratch, TP=2 (two GPUs, or two CPU processes over
   gloo), on the bundled self-cognition rows (``{{NAME}}``/``{{AUTHOR}}`` filled in) mixed with a
   generated arithmetic set, packed into 256-token rows, saving a torch_dist checkpoint;
3. exports the checkpoint to a Hugging Face directory, loads it with ``transformers`` and asks
   "who are you?".

    python examples/sft_demo.py [--max-steps 300] [--name Lumen] [--author "the lightning_megatron team"]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy, export_hf
from lightning_megatron.data.sft_datamodule import SFTDataModule
from lightning_megatron.data.text import bundled_corpus
from lightning_megatron.data.tokenizer import train_tokenizer

QUESTIONS = ["who are you?", "What is your name?", "What is 3 plus 4?"]


def arithmetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    return rows


def prepare(out: Path) -> None:
    """Rank 0, before the other rank starts: the general data set and the tokenizer."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(400)))
    texts = [bundled_corpus()[:150_000], (out / "general.jsonl").read_text()]
    train_tokenizer(texts, vocab_size=1024).save_pretrained(out / "tokenizer")


def ask(hf_dir: Path, questions: list[str] = QUESTIONS) -> None:
    """Load the export with transformers and answer each question greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    print(f"\n--- transformers, loading {hf_dir} ---")
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=end, pad_token_id=end)
        print(f"Q: {question}\nA: {tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--name", default="Lumen")
    parser.add_argument("--author", default="the lightning_megatron team")
    parser.add_argument("--out", type=Path, default=Path("sft_demo_output"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    L.seed_everything(0)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        prepare(args.out)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out / "tokenizer")
    data = SFTDataModule(
        ["self-cognition#300", f"{args.out / 'general.jsonl'}#300"],
        tokenizer,
        max_length=256,
        packing=True,
        batch_size=8,
        model_name=args.name,
        model_author=args.author,
    )
    config = GPTConfig.preset(
        "qwen2",
        vocab_size=len(tokenizer),
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=384,
        tie_word_embeddings=False,
    )
    model = GPTModule(config, lr=3e-3, warmup_steps=10)
    gpus = torch.cuda.device_count()
    trainer = L.Trainer(
        strategy=MegatronStrategy(tp=2, micro_batch_size=4),
        accelerator="gpu" if gpus >= 2 else "cpu",
        devices=2,
        precision="bf16-mixed" if gpus >= 2 else "32-true",
        max_steps=args.max_steps,
        logger=False,
        log_every_n_steps=20,
        callbacks=[
            ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True, every_n_train_steps=args.max_steps)
        ],
    )
    trainer.fit(model, datamodule=data)
    rank = trainer.global_rank
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    hf_dir = export_hf(args.out / "checkpoints" / "last.ckpt", args.out / "hf", progress=False)
    tokenizer.save_pretrained(hf_dir)
    ask(hf_dir)


if __name__ == "__main__":
    main()
