"""Training speed on one GPU, side by side in one process: Hugging Face vs lightning_megatron.

    python benchmarks/train_throughput.py --out /tmp/bench            # dense + MoE, H100-sized
    python benchmarks/train_throughput.py --tiny --device cpu        # the same code in seconds, on CPU

Cases, each on the same model shape, sequence length, global batch, random tokens and AdamW:

- ``hf``: plain transformers training, SDPA attention, bf16 weights, fused ``torch.optim.AdamW``,
  gradient accumulation over the microbatches;
- ``lightning``: ``GPTModule`` through ``L.Trainer(strategy=MegatronStrategy(tp=1))``,
  ``precision="bf16-mixed"`` (bf16 weights, fp32 master weights and gradients, distributed optimizer);
- ``bare``: the same Megatron model, optimizer and forward step driven by a plain loop over
  Megatron's ``get_forward_backward_func`` (Lightning's overhead is lightning / bare).

Prints per case tokens/s, model TFLOP/s (``model_flops_per_token``: 6 x matmul parameters + the
attention term), MFU against a bf16 matmul peak measured in the same run, and peak memory; then
the ratios. ``--variant name='{"fused_kernels": false}'`` adds bare-loop runs with other kernel
settings (the levers: the keys of ``run_bare``'s keyword arguments, e.g. ``expert_wgrad_fusion``,
``compiled_norm``, ``expert_swiglu``, ``shared_gate``, ``fused_qkv``, ``cuda_graphs``, ``triton_row_stats``,
``chained_graphs``, plus ``extra`` and ``sdpa``);
``--profile`` writes a torch-profiler breakdown of one step per case (and every kernel of it in order,
``profile_<shape>_<case>.tsv``), a cProfile of another and the host's waits for the GPU in a third.
Results go to ``--out`` as JSON lines (``results.jsonl``), profiles as text.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-1.5B: 1.54B parameters (tied embeddings).
    "dense": dict(
        family="qwen2",
        vocab_size=151936,
        num_layers=28,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=12,
        num_query_groups=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    # Qwen2-MoE layout at ~1.9B total parameters (~0.6B active per token).
    "moe": dict(
        family="qwen2_moe",
        vocab_size=151936,
        num_layers=16,
        hidden_size=1536,
        ffn_hidden_size=2048,
        num_attention_heads=12,
        num_query_groups=2,
        num_experts=32,
        moe_ffn_hidden_size=512,
        moe_router_topk=4,
        moe_shared_expert_intermediate_size=2048,
        # transformers computes no load-balancing loss unless output_router_logits=True: same work.
        moe_aux_loss_coeff=0.0,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
}
TINY = dict(vocab_size=512, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
TINY_LAYERS = {"dense": 2, "moe": 2}
TINY_MOE = dict(num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_shared_expert_intermediate_size=64)

LR = 1e-4
LOSSES: list = []  # training loss of every step of the case in this process (a sanity check)


# ------------------------------------------------------------------------------ measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float | None:
    """Median bf16 matmul rate on random data (the ceiling MFU is measured against)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def summarize(name: str, step_times: list[float], tokens_per_step: int, flops_per_token: float, peak, device):
    tokens_per_sec = tokens_per_step / statistics.mean(step_times)
    tflops = tokens_per_sec * flops_per_token / 1e12
    return {
        "case": name,
        "tokens_per_sec": tokens_per_sec,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": peak_memory_gib(device),
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "step_seconds": [round(t, 4) for t in step_times],
        "median_step_seconds": statistics.median(step_times),
    }


# ---------------------------------------------------------------------------------- profile
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor|foreach|_amp_"),
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|attention|cudnn"),
    ("grouped gemm", r"grouped|group_gemm|GroupedGemm"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|sm90_|ampere_|Kernel2|splitK"),
    ("compiled (triton)", r"^triton_"),
    ("norm", r"norm"),
    ("softmax / cross entropy", r"softmax|nll|cross_entropy|log_softmax"),
    ("copy / cast", r"copy|cast|cat|fill|index|scatter|gather"),
]


class StepProfile:
    """Profiles three steps: the first under the torch profiler (kernels, ops), the second under
    cProfile (host time by Python function), the third listing where the host waited for the GPU
    (``torch.cuda.set_sync_debug_mode``); ``start``/``stop`` bracket each step."""

    steps = 3

    def __init__(self, device: torch.device, path: Path) -> None:
        self.device, self.path, self.steps_done = device, path, 0
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        sync(self.device)
        if self.steps_done == 0:
            cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            self._torch = profile(activities=[ProfilerActivity.CPU, *cuda])
            self._torch.__enter__()
        elif self.steps_done == 1:
            import cProfile

            self._host = cProfile.Profile()
            self._host.enable()
        else:
            import warnings

            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
        self._start = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        wall = time.perf_counter() - self._start
        if self.steps_done == 0:
            self._torch.__exit__(None, None, None)
            self._lines = self._kernel_report(self._torch, wall)
            self._write_timeline(self._torch)
        elif self.steps_done == 1:
            import io
            import pstats

            self._host.disable()
            out = io.StringIO()
            pstats.Stats(self._host, stream=out).sort_stats("tottime").print_stats(40)
            self._lines += ["", "host time by Python function (cProfile of another step, top 40 by own time):"]
            self._lines += [out.getvalue()]
        else:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            syncs: dict[str, int] = {}
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    where = f"{w.filename}:{w.lineno}: {str(w.message)[:80]}"
                    syncs[where] = syncs.get(where, 0) + 1
            self._lines += ["", f"host waits for the GPU in a third step ({sum(syncs.values())}), by call site:"]
            self._lines += [f"  {n:5d}  {where}" for where, n in sorted(syncs.items(), key=lambda kv: -kv[1])]
            self.result["host_syncs"] = sum(syncs.values())
            self.path.write_text("\n".join(self._lines) + "\n")
        self.steps_done += 1

    def _write_timeline(self, prof: Any) -> None:
        """Every kernel of the profiled step in order (start and duration in us, name): what the
        summaries cannot show, such as which kernels sit next to a gap, layer by layer."""
        events = sorted(_kernel_events(prof), key=lambda e: e.time_range.start)
        if not events:
            return
        t0 = events[0].time_range.start
        rows = [f"{e.time_range.start - t0:.1f}\t{e.time_range.elapsed_us():.1f}\t{e.name[:120]}" for e in events]
        self.path.with_suffix(".tsv").write_text("start_us\tus\tkernel\n" + "\n".join(rows) + "\n")

    def _kernel_report(self, prof: Any, wall: float) -> list[str]:
        kernels: dict[str, float] = {}
        for event in _kernel_events(prof):
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3
        breakdown: dict[str, float] = {}
        for name, ms in kernels.items():
            category = next((c for c, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")
            breakdown[category] = breakdown.get(category, 0.0) + ms
        busy = sum(kernels.values())
        self.result = {
            "wall_ms": wall * 1e3,
            "kernel_ms": busy,
            "idle_ms": wall * 1e3 - busy,
            "breakdown_ms": dict(sorted(breakdown.items(), key=lambda kv: -kv[1])),
        }
        lines = [f"wall {wall * 1e3:.1f} ms, GPU kernels {busy:.1f} ms", "", "category ms:"]
        lines += [f"  {c:26s} {ms:9.1f}  {ms / max(busy, 1e-9):6.1%}" for c, ms in self.result["breakdown_ms"].items()]
        lines += ["", *_idle_gaps(prof)]
        lines += ["", "top kernels (ms, name):"]
        lines += [f"  {ms:9.1f}  {name[:160]}" for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:40]]
        try:
            sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table
            lines += ["", table(sort_by=sort_by, row_limit=40, max_name_column_width=80)]
            # Where the host's time goes (a CPU-bound step is limited by this, not by the kernels).
            lines += ["", table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80)]
        except Exception as error:  # the kernel list above is the part that matters
            lines += ["", f"(key_averages table unavailable: {error})"]
        return lines


def _kernel_events(prof: Any) -> list[Any]:
    """The profiled GPU kernels and copies, without the ``gpu_user_annotation`` ranges (such as
    "Optimizer.step#AdamW.step") that span kernels already counted. Kernel names contain "#" too
    (C++ lambdas: ``{lambda()#1}``), so the ranges are told apart by their flag or plain name."""
    return [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not re.fullmatch(r"[\w.]+#[\w.]+", e.name)
    ]


def _idle_gaps(prof: Any, top: int = 15) -> list[str]:
    """Where the GPU sat idle: gaps between consecutive kernels, summed by size, and the largest
    ones with the kernels on either side (a CPU-bound or host-syncing step shows up here)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in _kernel_events(prof))
    gaps, end, before = [], None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, before, name))
        if end is None or stop > end:
            end, before = stop, name
    if not gaps:
        return ["GPU idle gaps: none recorded"]
    total = sum(g for g, _, _ in gaps)
    buckets = {"< 10 us": 0.0, "10-100 us": 0.0, "0.1-1 ms": 0.0, ">= 1 ms": 0.0}
    for gap, _, _ in gaps:
        key = "< 10 us" if gap < 0.01 else "10-100 us" if gap < 0.1 else "0.1-1 ms" if gap < 1 else ">= 1 ms"
        buckets[key] += gap
    lines = [f"GPU idle between kernels: {total:.1f} ms in {len(gaps)} gaps; by gap size (ms): "]
    lines[0] += ", ".join(f"{k} {v:.1f}" for k, v in buckets.items())
    lines += [f"largest {top} (ms, after -> before):"]
    for gap, after, before_next in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {gap:8.2f}  {after[:70]} -> {before_next[:70]}")
    # Launch bubbles repeat at the same places (per layer or microbatch): sum them by neighbours.
    pairs: dict[tuple[str, str], list[float]] = {}
    for gap, after, before_next in gaps:
        if 0.01 <= gap < 0.1:
            pairs.setdefault((after[:70], before_next[:70]), []).append(gap)
    lines += [f"10-100 us gaps by neighbours, top {top} by total (ms, count, after -> before):"]
    for (after, before_next), sizes in sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(sizes):8.2f} {len(sizes):6d}  {after} -> {before_next}")
    return lines


def profile_step(step: Callable[[], None], device: torch.device, path: Path) -> dict[str, Any]:
    """More steps, profiled (see ``StepProfile``); returns the kernel breakdown (ms)."""
    profiler = StepProfile(device, path)
    for _ in range(profiler.steps):
        profiler.start()
        step()
        profiler.stop()
    return profiler.result


# -------------------------------------------------------------------------------------- data
def random_rows(vocab_size: int, rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq), generator=generator)


# ------------------------------------------------------------------------------------ cases
def run_hf(
    config, rows: torch.Tensor, args, device: torch.device, dtype: torch.dtype, wrap: Callable | None = None
) -> tuple[list[float], Callable]:
    """``wrap(model) -> model`` changes the model before training (e.g. peft's LoRA)."""
    from transformers import AutoModelForCausalLM

    from lightning_megatron.hf.convert import hf_config

    hf = hf_config(config, dtype)
    hf.use_cache = False
    with device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=dtype)
    if wrap is not None:
        model = wrap(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01, fused=device.type == "cuda")
    batch = args.micro_batch_size * args.num_microbatches

    def step(index: int) -> None:
        ids = rows[index * batch : (index + 1) * batch].to(device, non_blocking=True)
        total = 0.0
        for micro in ids.split(args.micro_batch_size):
            loss = model(input_ids=micro, labels=micro).loss / args.num_microbatches
            loss.backward()
            total += loss.detach()
        LOSSES.append(total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, args, device)
    return times, lambda: step(0)


def timed_steps(step: Callable[[int], None], args, device: torch.device) -> list[float]:
    times = []
    for index in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        step(index)
        sync(device)
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


class StepTimer:
    """Lightning callback: wall time of each training step (device synchronized); with a
    ``StepProfile``, the steps after ``timed`` ones are profiled instead."""

    def __init__(self, device: torch.device, timed: int, profiler: StepProfile | None = None) -> None:
        self.device, self.timed, self.profiler = device, timed, profiler
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.timed and self.profiler:
            return self.profiler.start()
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.timed and self.profiler:
            return self.profiler.stop()
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        LOSSES.append(outputs["loss"].detach())


def run_lightning(
    config,
    rows: torch.Tensor,
    args,
    device: torch.device,
    precision: str,
    callbacks: tuple = (),
    profiler: StepProfile | None = None,
) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_megatron import GPTModule, MegatronStrategy

    class Timer(StepTimer, L.Callback):
        pass

    steps = args.warmup + args.steps
    timer = Timer(device, steps, profiler)
    steps += StepProfile.steps if profiler else 0
    data = [{"input_ids": r, "labels": r} for r in rows[: steps * args.micro_batch_size * args.num_microbatches]]
    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=args.micro_batch_size),
        accelerator=device.type if device.type == "cpu" else "gpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the rows in order, as the other cases read them
        callbacks=[timer, *callbacks],
    )
    model = GPTModule(config, lr=LR, weight_decay=0.01, lr_decay="constant")
    batch_size = args.micro_batch_size * args.num_microbatches
    loader = DataLoader(data, batch_size=batch_size, pin_memory=device.type == "cuda")
    trainer.fit(model, loader)
    del trainer, model
    return timer.times[args.warmup :]


def run_bare(
    config,
    rows: torch.Tensor,
    args,
    device: torch.device,
    precision: str,
    fused_kernels: bool = True,
    grouped_experts: bool | None = None,
    fused_loss: bool | None = None,
    stacked_experts: bool | None = None,
    sorted_dispatch: bool | None = None,
    tensor_core_router: bool | None = None,
    embedding_grads: bool | None = None,
    expert_wgrad_fusion: bool | None = None,
    compiled_norm: bool | None = None,
    expert_swiglu: bool | None = None,
    shared_gate: bool | None = None,
    fused_qkv: bool | None = None,
    fused_adam: bool | None = None,
    cuda_graphs: bool | None = None,
    triton_row_stats: bool | None = None,
    chained_graphs: bool | None = None,
) -> tuple[list[float], Callable, Callable]:
    """The Megatron model of the lightning case, stepped by a plain loop (no Lightning)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from lightning_megatron import GPTModule
    from lightning_megatron.models import graphs
    from lightning_megatron.models import kernels as kernel_module
    from lightning_megatron.models.gpt import _GPTModel
    from lightning_megatron.models.graphs import layer_graphs_supported
    from lightning_megatron.models.init import init_weights
    from lightning_megatron.models.kernels import kernel_config_kwargs, limit_wgrad_fusion
    from lightning_megatron.models.specs import block_spec
    from lightning_megatron.optim import build_megatron_optimizer, optimizer_config_from, use_fused_adam
    from lightning_megatron.precision import MegatronPrecision
    from lightning_megatron.schedule import finalize_grads, split_microbatches

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    plugin = MegatronPrecision(precision)
    kernels = kernel_config_kwargs(device, plugin.params_dtype, fused_kernels)
    kernels = {k: v for k, v in kernels.items() if k not in config.extra}
    tconfig = config.to_transformer_config(**kernels, **plugin.transformer_config_kwargs())

    def lever(value: bool | None) -> bool:
        return fused_kernels if value is None else value

    kernel_module.TRITON_ROW_STATS = lever(triton_row_stats)
    graphs.CHAIN_BUFFERS = lever(chained_graphs)

    model = _GPTModel(
        fused_loss=lever(fused_loss),
        sorted_dispatch=lever(sorted_dispatch),
        tensor_core_router=lever(tensor_core_router),
        embedding_grads_into_main_grad=lever(embedding_grads),
        cuda_graphs=lever(cuda_graphs) and layer_graphs_supported(tconfig, device, use_te=False),
        config=tconfig,
        transformer_layer_spec=block_spec(
            tconfig,
            use_te=False,
            grouped_experts=lever(grouped_experts),
            stacked_experts=lever(stacked_experts),
            compiled_norm=lever(compiled_norm),
            fused_shared_gate=lever(shared_gate),
            fused_qkv=lever(fused_qkv),
        ),
        vocab_size=config.padded_vocab_size(1),
        max_sequence_length=config.max_position_embeddings,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
    )
    init_weights([model], 1234, config.init_method_std, config.num_layers)
    limit_wgrad_fusion([model])
    for module in model.modules():
        if hasattr(module, "fuse_wgrad"):  # StackedExperts (on with gradient_accumulation_fusion)
            module.fuse_wgrad = module.fuse_wgrad and lever(expert_wgrad_fusion)
            module.one_pass_swiglu = lever(expert_swiglu)
    chunk: torch.nn.Module = Float16Module(tconfig, model) if plugin.params_dtype != torch.float32 else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=plugin.grad_reduce_in_fp32, use_distributed_optimizer=True, check_for_nan_in_grad=False
    )
    chunk = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk)
    torch_optimizer = torch.optim.AdamW([torch.zeros(1)], lr=LR, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    optimizer = build_megatron_optimizer(
        optimizer_config_from(torch_optimizer),
        [chunk],
        use_distributed_optimizer=True,
        clip_grad=0.0,
        **plugin.optimizer_kwargs(),
    )
    if lever(fused_adam):
        use_fused_adam(optimizer)
    tconfig.finalize_model_grads_func = finalize_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    forward_backward = get_forward_backward_func()
    batch = args.micro_batch_size * args.num_microbatches

    # The Lightning case's own forward step (a module that is never attached to a Trainer).
    forward_step = GPTModule(config, lr=LR).forward_step

    def step(index: int) -> None:
        ids = rows[index * batch : (index + 1) * batch].to(device, non_blocking=True)
        chunk.zero_grad_buffer()
        optimizer.zero_grad()
        micro = split_microbatches({"input_ids": ids, "labels": ids}, args.micro_batch_size)
        outputs = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=chunk,
            num_microbatches=len(micro),
            seq_length=ids.shape[1],
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        loss_sum, tokens = torch.stack([out["loss"] for out in outputs]).sum(0)
        LOSSES.append(loss_sum / tokens)
        optimizer.step()

    times = timed_steps(step, args, device)

    def cleanup() -> None:
        ps.destroy_model_parallel()

    return times, (lambda: step(0)), cleanup


def set_sdpa_backends(names: list[str] | None) -> None:
    """Order of SDPA kernels for the local spec's attention, e.g. ["CUDNN_ATTENTION", "FLASH_ATTENTION"]."""
    from torch.nn.attention import SDPBackend

    from lightning_megatron.models.layers import SDPAttention

    SDPAttention.cuda_backends = tuple(getattr(SDPBackend, n) for n in names) if names else None


# ------------------------------------------------------------------------------------- main
def shape_config(name: str, tiny: bool, seq: int):
    from lightning_megatron import GPTConfig

    values = dict(SHAPES[name])
    if tiny:
        values.update(TINY, num_layers=TINY_LAYERS[name])
        if name == "moe":
            values.update(TINY_MOE)
    values["max_position_embeddings"] = max(values["max_position_embeddings"], seq)
    return GPTConfig.preset(values.pop("family"), **values)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("megatron-core", "lightning", "transformers", "lightning-megatron"):
        try:
            out[package] = version(package)
        except Exception:
            out[package] = "?"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda or "?"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["dense", "moe"], choices=sorted(SHAPES))
    parser.add_argument("--cases", nargs="+", default=["hf", "lightning", "bare"], choices=["hf", "lightning", "bare"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="extra bare-loop runs, e.g. eager='{\"fused_kernels\": false}' or "
        'fp32ce=\'{"extra": {"cross_entropy_loss_fusion": false}}\'',
    )
    parser.add_argument("--profile", action="store_true", help="profile three extra steps of each case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and sequence (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq = min(args.seq, 64)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    return args


def jobs(args: argparse.Namespace) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(shape, case, variant name, variant) in run order."""
    variants = [("default", {})]
    for spec in args.variant:
        name, _, text = spec.partition("=")
        variants.append((name, json.loads(text)))
    out = []
    for shape in args.shapes:
        out += [(shape, case, "default", {}) for case in ("hf", "lightning") if case in args.cases]
        out += [(shape, "bare", n, v) for n, v in variants if n != "default" or "bare" in args.cases]
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every case in its own process (a fresh allocator and CUDA context each), then tabulate."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    info = {"versions": versions(), "matmul_peak_tflops": matmul_peak_tflops(device)}
    (args.out / "info.json").write_text(json.dumps(info))
    (args.out / "results.jsonl").unlink(missing_ok=True)
    print(json.dumps(info), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    argv = list(sys.argv[1:] if argv is None else argv)
    for index, (shape, case, name, _) in enumerate(jobs(args)):
        print(f"--- {shape} {case} {name}", flush=True)
        done = subprocess.run([sys.executable, __file__, *argv, "--job", str(index)])
        if done.returncode:
            print(f"{shape} {case} {name} failed with exit code {done.returncode}", flush=True)
    rows = (
        [json.loads(line) for line in (args.out / "results.jsonl").open()]
        if (args.out / "results.jsonl").exists()
        else []
    )
    print_table(rows, info["matmul_peak_tflops"])


def run_job(args: argparse.Namespace) -> None:
    from lightning_megatron.callbacks import model_flops_per_token
    from lightning_megatron.cpu import cpu_mode

    shape, case, name, variant = jobs(args)[args.job]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    info = json.loads((args.out / "info.json").read_text())
    peak = info["matmul_peak_tflops"]
    base = shape_config(shape, args.tiny, args.seq)
    tokens_per_step = args.micro_batch_size * args.num_microbatches * args.seq
    flops = model_flops_per_token(base, args.seq)
    steps = args.warmup + args.steps + (StepProfile.steps if args.profile else 0)
    rows = random_rows(base.vocab_size, steps * args.micro_batch_size * args.num_microbatches, args.seq)
    extra = dict(shape=shape, seq=args.seq, tokens_per_step=tokens_per_step, flops_per_token=flops)
    profile_path = args.out / f"profile_{shape}_{case}.txt"
    reset_memory(device)
    if case == "hf":
        times, one_step = run_hf(base, rows, args, device, dtype)
        result = summarize("hf", times, tokens_per_step, flops, peak, device) | extra
        if args.profile:
            result["profile"] = profile_step(one_step, device, profile_path)
    elif case == "lightning":
        profiler = StepProfile(device, profile_path) if args.profile else None
        times = run_lightning(base, rows, args, device, precision, profiler=profiler)
        result = summarize("lightning", times, tokens_per_step, flops, peak, device) | extra
        if profiler:
            result["profile"] = profiler.result
    else:
        config = dataclasses.replace(base, extra={**base.extra, **variant.get("extra", {})})
        set_sdpa_backends(variant.get("sdpa"))
        # Megatron on CPU needs the library's CPU mode (the strategy enters it for the Trainer).
        with cpu_mode() if device.type == "cpu" else contextlib.nullcontext():
            times, one_step, cleanup = run_bare(
                config,
                rows,
                args,
                device,
                precision,
                fused_kernels=variant.get("fused_kernels", True),
                grouped_experts=variant.get("grouped_experts"),
                fused_loss=variant.get("fused_loss"),
                stacked_experts=variant.get("stacked_experts"),
                sorted_dispatch=variant.get("sorted_dispatch"),
                tensor_core_router=variant.get("tensor_core_router"),
                embedding_grads=variant.get("embedding_grads"),
                expert_wgrad_fusion=variant.get("expert_wgrad_fusion"),
                compiled_norm=variant.get("compiled_norm"),
                expert_swiglu=variant.get("expert_swiglu"),
                shared_gate=variant.get("shared_gate"),
                fused_qkv=variant.get("fused_qkv"),
                fused_adam=variant.get("fused_adam"),
                cuda_graphs=variant.get("cuda_graphs"),
                triton_row_stats=variant.get("triton_row_stats"),
                chained_graphs=variant.get("chained_graphs"),
            )
            label = "bare" if name == "default" else f"bare:{name}"
            result = summarize(label, times, tokens_per_step, flops, peak, device) | extra | {"variant": variant}
            if args.profile and name == "default":
                result["profile"] = profile_step(one_step, device, profile_path)
            cleanup()
    result["losses"] = [round(float(x), 4) for x in LOSSES]
    result.update(info)
    with (args.out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}), flush=True)


def print_table(rows: list[dict[str, Any]], peak: float | None) -> None:
    print(f"\nmatmul peak (bf16, 8192^3): {peak:.0f} TFLOP/s" if peak else "\nmatmul peak: n/a (CPU)")
    # Reserved memory is the fair comparison with CUDA graphs: their pool stays reserved between
    # replays while the allocator counts it as free (max_memory_allocated undercounts).
    print("| shape | case | tokens/s | TFLOP/s | MFU | peak mem GiB | reserved GiB | vs hf |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    hf = {r["shape"]: r["tokens_per_sec"] for r in rows if r["case"] == "hf"}
    bare = {r["shape"]: r["tokens_per_sec"] for r in rows if r["case"] == "bare"}
    for r in rows:
        ratio = f"{r['tokens_per_sec'] / hf[r['shape']]:.2f}x" if r["shape"] in hf else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        reserved = f"{r['reserved_gib']:.1f}" if r.get("reserved_gib") is not None else "-"
        print(
            f"| {r['shape']} | {r['case']} | {r['tokens_per_sec']:,.0f} | {r['tflops']:.1f} | {mfu} | {mem} | "
            f"{reserved} | {ratio} |"
        )
    for shape in bare:
        light = next((r for r in rows if r["shape"] == shape and r["case"] == "lightning"), None)
        plain = next(r for r in rows if r["shape"] == shape and r["case"] == "bare")
        if light:
            # The median is the steadier of the two when a few steps stall (allocator, clocks).
            median = light["median_step_seconds"] / plain["median_step_seconds"] - 1
            print(
                f"{shape}: Lightning overhead vs bare loop: {1 - light['tokens_per_sec'] / bare[shape]:+.1%} "
                f"(mean step time), {median:+.1%} (median step time)"
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parsed = parse_args()
    run_job(parsed) if parsed.job is not None else main()
