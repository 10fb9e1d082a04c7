"""Convert a Hugging Face model to a Megatron torch_dist checkpoint under TP=2 and back, with
`lightning-megatron export`, and check that transformers gives the same logits at the end.

    python examples/convert.py --model path/to/hf_model [--tp 2] [--out convert_output]
    python examples/convert.py                      # a tiny random Qwen2 model, made locally

Steps (each is one command you can also run by hand):

    lightning-megatron export --to-mcore --model HF --output OUT/mcore --tp 2 --test-convert-precision
    lightning-megatron check --model HF --load OUT/mcore     # (tp > 1: the check runs in a new process)
    lightning-megatron export --to-hf --load OUT/mcore --output OUT/hf --test-convert-precision
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch


def make_tiny_model(directory: Path) -> Path:
    """A random Qwen2-style model saved with transformers (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so every layer shows in the logits
        for param in model.parameters():
            param.normal_(0, 0.1) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


def lightning_megatron(*args: object) -> None:
    command = [sys.executable, "-m", "lightning_megatron.cli", *map(str, args)]
    print("$ lightning-megatron " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face model directory (default: a tiny random one)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("convert_output"))
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty; pass a new directory")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or make_tiny_model(args.out / "original")

    mcore, hf = args.out / "mcore", args.out / "hf"
    # --test-convert-precision compares the logits of both sides (fails the command when they differ).
    lightning_megatron(
        "export", "--to-mcore", "--model", model, "--output", mcore, "--tp", args.tp, "--test-convert-precision"
    )
    if args.tp > 1:
        lightning_megatron("check", "--model", model, "--load", mcore)
    lightning_megatron("export", "--to-hf", "--load", mcore, "--output", hf, "--test-convert-precision")

    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    diff = (logits(model, ids) - logits(hf, ids)).abs().max().item()
    print(f"round trip HF -> Megatron (tp={args.tp}) -> HF: max |logit diff| {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise SystemExit(f"the round trip changed the logits by {diff:.2e} (> 1e-4)")


if __name__ == "__main__":
    main()
