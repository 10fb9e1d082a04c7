"""ThroughputMonitor: tokens/s, samples/s, model TFLOP/s per device, MFU and peak memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from lightning_megatron.models.config import GPTConfig

# Dense bf16 peak (TFLOP/s) by device-name substring; override with ThroughputMonitor(peak_tflops=...).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def model_flops_per_token(config: GPTConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters active per token) + causal attention.

    Attention adds ``12 * layers * seq * heads * head_dim`` (QK^T and AV, forward and backward,
    without halving for the causal mask, as Megatron and most MFU reports count it).
    """
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_query_groups * d
    attention = h * (q_out + 2 * kv_out) + q_out * h
    if config.is_moe:
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        mlp = config.moe_router_topk * 3 * h * ffn + h * config.num_experts
        if config.moe_shared_expert_intermediate_size:
            mlp += 3 * h * config.moe_shared_expert_intermediate_size
    else:
        mlp = 3 * h * config.ffn_hidden_size
    matmul_params = config.num_layers * (attention + mlp) + config.vocab_size * h
    return 6.0 * matmul_params + 12.0 * config.num_layers * seq_length * q_out


class ThroughputMonitor(L.Callback):
    """Log training throughput every ``log_every_n_steps`` steps.

    Logged (per step, averaged over the window): ``perf/tokens_per_sec`` and
    ``perf/samples_per_sec`` (whole job), ``perf/tflops_per_device``, ``perf/mfu`` (when the
    device's peak is known or given), ``perf/step_time`` and ``perf/peak_memory_gib``.

    Args:
        peak_tflops: the device's dense peak for the training dtype; default from a small table.
        window: steps per measurement (the first window includes warm-up; read later ones).
    """

    def __init__(self, peak_tflops: float | None = None, window: int = 5) -> None:
        self.peak_tflops = peak_tflops
        self.window = window
        self.history: list[dict[str, float]] = []
        self._start: float | None = None
        self._tokens = 0
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            _synchronize(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from megatron.core import parallel_state as ps

        ids = batch["input_ids"]
        dp = ps.get_data_parallel_world_size()
        self._tokens += ids.numel() * dp
        self._samples += ids.shape[0] * dp
        self._steps += 1
        if self._steps < self.window:
            return
        _synchronize(pl_module)
        elapsed = time.perf_counter() - self._start
        tokens_per_sec = self._tokens / elapsed
        flops = model_flops_per_token(pl_module.config, ids.shape[1]) * tokens_per_sec
        metrics = {
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/samples_per_sec": self._samples / elapsed,
            "perf/step_time": elapsed / self._steps,
            "perf/tflops_per_device": flops / trainer.world_size / 1e12,
        }
        peak = self.peak_tflops or _known_peak(pl_module.device)
        if peak:
            metrics["perf/mfu"] = metrics["perf/tflops_per_device"] / peak
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.history.append(metrics)
        pl_module.log_dict(metrics, prog_bar=False)
        self._start, self._tokens, self._samples, self._steps = time.perf_counter(), 0, 0, 0


def _synchronize(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize()


def _known_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
