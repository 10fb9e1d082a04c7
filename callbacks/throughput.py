"""ThroughputMonitor: tokens/s, samples/s, model TFLOP/s per device, MFU, step time and peak memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from lightning_megatron.models.config import GPTConfig

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by device-name substring, first match
# wins; override with ThroughputMonitor(peak_tflops=...) for other devices or dtypes.
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 125.0,
}


def model_flops_per_token(config: GPTConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters active per token) + causal attention.

    Attention adds ``12 * layers * seq * heads * head_dim`` (QK^T and AV, forward and backward,
    without halving for the causal mask, as Megatron and most MFU reports count it). Recompute
    is not counted (model FLOPs, not hardware FLOPs).
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
    """Measure training throughput over windows of ``window`` steps.

    After each window these are logged with ``self.log`` (so they reach whatever logger the
    Trainer has, at its ``log_every_n_steps``, and ``trainer.callback_metrics``); the latest
    window's values are re-logged every step until the next window ends:

    - ``perf/tokens_per_sec`` and ``perf/samples_per_sec``: the whole job (every data-parallel
      rank), padding tokens included;
    - ``perf/step_time``: seconds per optimizer step (data loading included, validation not);
    - ``perf/tflops_per_device``: model FLOPs (:func:`model_flops_per_token`) per second per GPU;
    - ``perf/mfu``: that over the device's peak, when it is known or given;
    - ``perf/peak_memory_gib``: the largest ``torch.cuda.max_memory_allocated`` over all ranks (GPU).

    ``prog_bar`` names the ones also shown in the progress bar. ``history`` keeps every window's
    values on every rank.

    Args:
        peak_tflops: the device's dense peak for the training dtype; default from ``PEAK_BF16_TFLOPS``.
        window: steps per measurement (the first window includes warm-up; read later ones).
        prog_bar: metric names shown in the progress bar.
    """

    def __init__(
        self,
        peak_tflops: float | None = None,
        window: int = 5,
        prog_bar: tuple[str, ...] = ("perf/tokens_per_sec", "perf/mfu"),
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 (steps per measurement)")
        self.peak_tflops = peak_tflops
        self.window = window
        self.prog_bar = set(prog_bar)
        self.history: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._elapsed = 0.0
        self._tokens = 0
        self._samples = 0
        self._steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()  # a second fit starts a fresh window

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            _synchronize(pl_module)
            self._start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation inside fit is not training time: pause the clock until the next batch.
        if self._start is not None:
            _synchronize(pl_module)
            self._elapsed += time.perf_counter() - self._start
            self._start = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from megatron.core import parallel_state as ps

        ids = batch["input_ids"]
        dp = ps.get_data_parallel_world_size()
        self._tokens += ids.numel() * dp
        self._samples += ids.shape[0] * dp
        self._steps += 1
        if self._steps >= self.window:
            self.history.append(self._measure(trainer, pl_module, ids.shape[1]))
            self._elapsed, self._tokens, self._samples, self._steps = 0.0, 0, 0, 0
            self._start = time.perf_counter()
        if self.history:
            for name, value in self.history[-1].items():
                pl_module.log(name, value, prog_bar=name in self.prog_bar)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, seq_length: int) -> dict[str, float]:
        _synchronize(pl_module)
        elapsed = self._elapsed + time.perf_counter() - self._start
        tokens_per_sec = self._tokens / elapsed
        flops = model_flops_per_token(pl_module.config, seq_length) * tokens_per_sec
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
            memory = torch.tensor(float(torch.cuda.max_memory_allocated()), device=pl_module.device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
            metrics["perf/peak_memory_gib"] = memory.item() / 2**30
        return metrics


def _synchronize(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize()


def _known_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
