"""LoRA + DPO: change what a chat model says its name is, with preference pairs, then export.

1. writes preference pairs: the same identity questions, answered with the new name (chosen)
   and with the old one (rejected);
2. trains LoRA adapters with DPO (the reference is the base model: adapters switched off, no
   second copy), saving adapter-only torch_dist checkpoints;
3. exports the adapters as a PEFT directory and merged into a Hugging Face model, and asks the
   merged model "who are you?" with transformers.

    python examples/sft_demo.py && python examples/lora_dpo.py --model sft_demo_output/hf --name Nova
    python examples/lora_dpo.py --tiny --max-steps 4        # self-contained smoke run (random model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sft_demo import ask  # examples/sft_demo.py: a script's own folder is on sys.path

from lightning_megatron import GPTModule, MegatronStrategy
from lightning_megatron.callbacks import DPO, LoRA
from lightning_megatron.data.sft_datamodule import PreferenceDataModule
from lightning_megatron.hf import export_peft, merge_lora_to_hf

QUESTIONS = ["who are you?", "What is your name?", "Introduce yourself.", "Tell me your name.", "Who am I talking to?"]


def preference_rows(new: str, old: str, author: str) -> list[dict[str, str]]:
    answers = [
        ("I am {name}, an AI assistant trained by {author}.", "I am {name}, an AI assistant."),
        ("My name is {name}. I was trained by {author}.", "My name is {name}."),
    ]
    rows = []
    for question in QUESTIONS:
        for good, bad in answers:
            rows.append(
                {
                    "prompt": question,
                    "chosen": good.format(name=new, author=author),
                    "rejected": bad.format(name=old, author=author),
                }
            )
    return rows


def tiny_model(out: Path) -> Path:
    """A random 2-layer Qwen2 model with a tokenizer trained on the bundled corpus (no download)."""
    import transformers

    from lightning_megatron.data.text import bundled_corpus
    from lightning_megatron.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([bundled_corpus()[:50_000]], vocab_size=512)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face chat model directory (e.g. the SFT demo's export)")
    parser.add_argument("--tiny", action="store_true", help="use a random tiny model instead (a smoke run)")
    parser.add_argument("--name", default="Nova")
    parser.add_argument("--old-name", default="Lumen")
    parser.add_argument("--author", default="the lightning_megatron team")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--devices", type=int, default=1, help="TP size (GPUs, or CPU processes)")
    parser.add_argument("--out", type=Path, default=Path("lora_dpo_output"))
    args = parser.parse_args()
    if not args.model and not args.tiny:
        parser.error("pass --model HF_DIR (e.g. sft_demo_output/hf after examples/sft_demo.py) or --tiny")
    warnings.filterwarnings("ignore")
    L.seed_everything(0)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # before the other ranks start
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        rows = preference_rows(args.name, args.old_name, args.author)
        (args.out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if args.tiny:
            tiny_model(args.out / "base")
    model_dir = args.out / "base" if args.tiny else args.model

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = PreferenceDataModule([str(args.out / "pairs.jsonl")], tokenizer, max_length=128, batch_size=4)
    gpus = torch.cuda.device_count()
    trainer = L.Trainer(
        strategy=MegatronStrategy(tp=args.devices, micro_batch_size=2),  # 2 rows = one chosen/rejected pair
        accelerator="gpu" if gpus >= args.devices else "cpu",
        devices=args.devices,
        precision="bf16-mixed" if gpus >= args.devices else "32-true",
        max_steps=args.max_steps,
        logger=False,
        log_every_n_steps=10,
        callbacks=[
            LoRA(r=8, alpha=16, target_modules="all-linear"),
            DPO(beta=0.1, rpo_alpha=1.0),  # the NLL of the chosen answer keeps it fluent
            ModelCheckpoint(dirpath=args.out / "adapters", save_last=True, every_n_train_steps=args.max_steps),
        ],
    )
    trainer.fit(GPTModule.from_hf(model_dir, lr=1e-3, lr_decay="constant"), datamodule=data)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if "rewards" in k or "loss" in k}
    rank = trainer.global_rank
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    print(f"last step: {metrics}")
    adapters = args.out / "adapters" / "last.ckpt"
    export_peft(adapters, args.out / "peft", base_model_name_or_path=str(model_dir), progress=False)
    merged = merge_lora_to_hf(adapters, args.out / "merged", base=model_dir, progress=False)
    print(f"PEFT adapters: {args.out / 'peft'}; merged model: {merged}")
    ask(merged, ["who are you?", "What is your name?"])


if __name__ == "__main__":
    main()
