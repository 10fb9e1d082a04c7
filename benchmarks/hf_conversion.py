"""Hugging Face <-> Megatron conversion cost on a random ~1B Llama-shape model (CPU is enough).

    python benchmarks/hf_conversion.py --out /tmp/conv-bench

Builds a random bf16 HF model (2 GB safetensors shards), then times ``lightning-megatron export
--to-mcore`` and ``--to-hf`` in their own processes and reports each one's peak resident memory
(from the kernel's accounting of that process) and the sizes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)


def make_model(directory: Path) -> None:
    code = (
        "import torch, transformers; "
        f"c = transformers.LlamaConfig(**{SHAPE!r}); "
        "m = transformers.AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16); "
        f"m.save_pretrained({str(directory)!r}, max_shard_size='2GB')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def measured(cmd: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_GiB": usage.ru_maxrss / (1 << 20)}


def size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1 << 30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/conv-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    hf, mcore, back = args.out / "hf", args.out / "mcore", args.out / "hf-back"
    make_model(hf)
    cli = [sys.executable, "-m", "lightning_megatron.cli", "export"]
    rows = {
        "to_mcore": measured([*cli, "--to-mcore", "--model", str(hf), "--output", str(mcore)]),
        "to_hf": measured([*cli, "--to-hf", "--load", str(mcore), "--output", str(back)]),
    }
    shard = max(p.stat().st_size for p in hf.glob("*.safetensors")) / (1 << 30)
    sizes = {
        "hf_GiB": size_gib(hf),
        "largest_hf_shard_GiB": shard,
        "mcore_GiB": size_gib(mcore),
        "hf_back_GiB": size_gib(back),
    }
    print(json.dumps({"shape": SHAPE, **rows, **sizes}))
    print("\n| step | seconds | peak RSS GiB |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_rss_GiB']:.2f} |")
    print(
        f"\nsizes: HF {sizes['hf_GiB']:.2f} GiB (largest shard {shard:.2f}), torch_dist {sizes['mcore_GiB']:.2f} GiB, "
        f"exported HF {sizes['hf_back_GiB']:.2f} GiB"
    )
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
