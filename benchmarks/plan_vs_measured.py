"""The planner's memory estimate against the measured peak, one layout per run.

    python benchmarks/plan_vs_measured.py --layout tp=1,pp=1,mbs=1,recompute=none --out results.jsonl
    python benchmarks/plan_vs_measured.py --devices 2 --layout tp=2,mbs=2,recompute=selective --out results.jsonl

Trains a Llama-shaped model (``--model``: a preset family or HF config; default ~1B) on random
tokens for a few steps under the layout (sequence parallel when tp > 1, the layout's own
RecomputeConfig, bf16-mixed on GPU) and appends one JSON line: the estimate of the busiest stage
(``lightning_megatron.plan.estimate``) and the measured peak, the largest
``torch.cuda.max_memory_allocated()`` over the ranks of that stage, with the relative error.
Run each layout in a fresh process (memory peaks do not reset between fits in one process).
On CPU it runs but measures nothing (``measured_bytes`` is null).
"""

from __future__ import annotations

import argparse
import json
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.plan import estimate, load_model_config, parse_layout

ONE_B = dict(
    vocab_size=32000,
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=5632,
    tie_word_embeddings=False,
)


class PeakMemory(L.Callback):
    """Each rank's peak allocated bytes and pipeline stage, gathered on every rank at the end."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning_megatron import parallel

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else -1
        mine = torch.tensor([float(peak), float(parallel.pp_rank())], device=module.device)
        everyone = [torch.zeros_like(mine) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(everyone, mine)
        trainer.callback_metrics["peaks"] = torch.stack(everyone).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="e.g. tp=2,pp=1,mbs=2,recompute=full")
    parser.add_argument("--model", help="preset family or HF dir/config.json (default: a ~1B Llama shape)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True, help="JSON lines file to append to")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = load_model_config(args.model) if args.model else GPTConfig.preset("llama", **ONE_B)
    layout = parse_layout(args.layout)
    gpu = torch.cuda.is_available()
    precision = "bf16-mixed" if gpu else "32-true"
    candidate = estimate(config, layout, args.devices, args.seq_length, args.global_batch_size, precision=precision)
    if not candidate.valid:
        raise SystemExit(f"{layout.label()}: {candidate.reason}")

    torch.manual_seed(0)
    dp_batch = args.global_batch_size // candidate.dp
    rows = torch.randint(0, config.vocab_size, (dp_batch * candidate.dp * args.steps, args.seq_length))
    data = [{"input_ids": row, "labels": row} for row in rows]
    strategy = MegatronStrategy(
        tp=layout.tp,
        pp=layout.pp,
        cp=layout.cp,
        ep=layout.ep,
        sp=layout.sp,
        micro_batch_size=layout.micro_batch_size,
        recompute=layout.recompute_config(config),
    )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu" if gpu else "cpu",
        devices=args.devices,
        precision=precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PeakMemory()],
    )
    trainer.fit(GPTModule(config), DataLoader(data, batch_size=dp_batch))
    if trainer.global_rank != 0:
        return
    peaks = trainer.callback_metrics["peaks"]
    stage = candidate.memory.stage
    measured = max(int(p) for p, s in peaks.tolist() if int(s) == stage) if gpu else None
    result = {
        "layout": layout.label(),
        "devices": args.devices,
        "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "estimate": candidate.memory.to_dict(),
        "measured_bytes": measured,
        "relative_error": (candidate.memory.total - measured) / measured if measured else None,
    }
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
