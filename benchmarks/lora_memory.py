"""LoRA vs full fine-tuning on one GPU: peak memory and tokens/s, next to peft + transformers.

    python benchmarks/lora_memory.py --out /tmp/lora-bench            # Qwen2.5-1.5B shape, seq 4096
    python benchmarks/lora_memory.py --tiny --device cpu             # the same code in seconds

Cases, each in a fresh process, on the same model shape, random tokens, global batch and AdamW
(bf16 on GPU): ``full`` and ``lora`` through ``L.Trainer(strategy=MegatronStrategy(tp=1))``
(bf16-mixed: bf16 weights, fp32 master weights of what trains, distributed optimizer), and
``hf_full`` and ``hf_lora`` with transformers (bf16 weights, fused AdamW; LoRA by peft). LoRA is
r=8, alpha=32 on every linear of the layers (peft's "all-linear"). The model FLOPs column counts
the full-training FLOPs (6 x parameters), so for LoRA it is a nominal rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as bench  # noqa: E402

CASES = ("full", "lora", "hf_full", "hf_lora")
R, ALPHA = 8, 32


def peft_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))


def run_case(case: str, args: argparse.Namespace) -> dict:
    from lightning_megatron.callbacks import LoRA, model_flops_per_token

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = bench.shape_config("dense", args.tiny, args.seq)
    flops = model_flops_per_token(config, args.seq)
    tokens_per_step = args.micro_batch_size * args.num_microbatches * args.seq
    rows = bench.random_rows(
        config.vocab_size, (args.warmup + args.steps) * args.micro_batch_size * args.num_microbatches, args.seq
    )
    bench.reset_memory(device)
    if case.startswith("hf"):
        times, _ = bench.run_hf(config, rows, args, device, dtype, wrap=peft_lora if case == "hf_lora" else None)
    else:
        callbacks = (LoRA(r=R, alpha=ALPHA, target_modules="all-linear"),) if case == "lora" else ()
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        times = bench.run_lightning(config, rows, args, device, precision, callbacks=callbacks)
    result = bench.summarize(case, times, tokens_per_step, flops, None, device)
    result["losses"] = [round(float(x), 4) for x in bench.LOSSES]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("lora-bench"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 64), 2, 1
    if args.case:  # one case, in this fresh process
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(run_case(args.case, args)) + "\n")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    for case in args.cases:
        print(f"--- {case}", flush=True)
        subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--case", case], check=False)
    rows = {r["case"]: r for r in map(json.loads, (args.out / "results.jsonl").open())}
    print(json.dumps(bench.versions()))
    # Reserved memory: with CUDA graphs (the lightning cases on one GPU) the allocated peak undercounts.
    print("| case | tokens/s | peak allocated GiB | peak reserved GiB | vs full (reserved) | vs hf_lora (tokens/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    full, reference = rows.get("full", {}).get("reserved_gib"), rows.get("hf_lora", {}).get("tokens_per_sec")
    for case, r in rows.items():
        mem, reserved, speed = r.get("peak_memory_gib"), r.get("reserved_gib"), r["tokens_per_sec"]
        vs_full = f"{reserved / full:.2f}" if reserved and full else "-"
        vs_peft = f"{speed / reference:.2f}x" if reference else "-"
        mem_text = "-" if mem is None else f"{mem:.1f}"
        reserved_text = "-" if reserved is None else f"{reserved:.1f}"
        print(f"| {case} | {speed:,.0f} | {mem_text} | {reserved_text} | {vs_full} | {vs_peft} |")


if __name__ == "__main__":
    main()
