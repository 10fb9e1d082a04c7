"""Rank helpers, the rank-aware logger and the memory the plan estimates, measured on CPU ranks.

Each layout is one short ``fit`` (2 steps, so Adam's state exists); every rank writes what the
rank helpers return, which messages its logger emitted, and the bytes of its own parameters,
gradient buffers and optimizer state to ``--out/<layout>-rank<r>.json``.

    python tests/scripts/ranks_and_memory.py --layouts tp2 pp2 dp2 --precision bf16-mixed --out results/
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy, parallel
from lightning_megatron.data.text import ByteTokenizer, TokenBlocks, bundled_corpus

SEQ, GLOBAL_BATCH = 32, 4
CONFIG = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)
LAYOUTS = {"tp2": dict(tp=2, sp=True), "pp2": dict(pp=2), "dp2": dict()}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class SavedActivations(L.Callback):
    """Bytes of the tensors autograd saves for backward in the forward passes of a training step
    (each storage once; parameters excluded). With one microbatch per step that is what the
    step keeps for backward."""

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            # Forward only: what recompute saves during backward is transient.
            if storage.data_ptr() not in params and torch._C._current_graph_task_id() == -1:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._hooks.__exit__(None, None, None)
        self.bytes = sum(self.storages.values())


class Measure(L.Callback):
    def __init__(self, out: Path, layout: str, activations: SavedActivations) -> None:
        self.out, self.layout, self.activations = out, layout, activations

    def on_train_end(self, trainer: L.Trainer, module: GPTModule) -> None:
        handler = Collect()
        log = parallel.rank_logger("ranks_and_memory")
        log.logger.addHandler(handler)
        log.logger.setLevel(logging.INFO)
        log.info_rank_0("once")
        log.info_all_ranks("everyone")
        log.logger.removeHandler(handler)

        strategy = trainer.strategy
        params = {id(p): p for chunk in strategy._bare_chunks for p in chunk.parameters()}
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for c in module.chunks for b in c.buffers)
        megatron = strategy.optimizers[0].megatron
        optimizer_bytes = 0
        for opt in getattr(megatron, "chained_optimizers", [megatron]):
            for state in opt.optimizer.state.values():
                optimizer_bytes += sum(t.numel() * t.element_size() for t in state.values() if t.numel() > 1)
            for group in opt.shard_fp32_from_float16_groups:  # fp32 master weights (mixed precision)
                optimizer_bytes += sum(t.numel() * t.element_size() for t in group)
        result = {
            "rank": trainer.global_rank,
            "sizes": {k: getattr(parallel, f"{k}_size")() for k in ("tp", "pp", "dp", "cp", "ep")},
            "ranks": {k: getattr(parallel, f"{k}_rank")() for k in ("tp", "pp", "dp", "cp", "ep")},
            "tp_group_size": torch.distributed.get_world_size(parallel.tp_group()),
            "dp_group_size": torch.distributed.get_world_size(parallel.dp_group()),
            "prefix": parallel.rank_prefix(),
            "messages": handler.messages,
            "params": sum(p.numel() for p in params.values()),
            "weights": sum(p.numel() * p.element_size() for p in params.values()),
            "grads": grads,
            "optimizer": optimizer_bytes,
            "activations": self.activations.bytes,
        }
        (self.out / f"{self.layout}-rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), required=True)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteTokenizer()
    data = TokenBlocks.from_text(bundled_corpus()[:20000], tokenizer, SEQ)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **CONFIG)
    for layout in args.layouts:
        tp, pp = LAYOUTS[layout].get("tp", 1), LAYOUTS[layout].get("pp", 1)
        dp = 2 // (tp * pp)
        # One microbatch per step: the saved activations of the step are those of one microbatch.
        strategy = MegatronStrategy(**LAYOUTS[layout], micro_batch_size=GLOBAL_BATCH // dp)
        activations = SavedActivations()
        trainer = L.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=2,
            precision=args.precision,
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[activations, Measure(args.out, layout, activations)],
        )
        trainer.fit(GPTModule(config), DataLoader(data, batch_size=GLOBAL_BATCH // dp))


if __name__ == "__main__":
    main()
