"""One optimizer step's worth of microbatches through Megatron-Core's pipeline schedule.

``forward_backward`` is where the schedule is called: it splits the data-parallel-local batch into
microbatches, runs ``get_forward_backward_func()`` (no pipelining, 1F1B, or interleaved 1F1B when
the model has several virtual-pipeline chunks) and reduces the per-microbatch loss sums into one
token-weighted mean that is the same on every rank and under every parallel layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.utils import get_pp_last_rank
from torch import Tensor

# forward_step(data_iterator, model_chunk) -> (output_tensor, loss_func), Megatron's contract.
ForwardStep = Callable[[Iterator[dict[str, Tensor]], torch.nn.Module], tuple[Tensor, Callable]]


def finalize_grads(
    model: list[torch.nn.Module], num_tokens: Tensor | None = None, pg_collection: Any = None, **kwargs: Any
) -> None:
    """Megatron-Core's ``finalize_model_grads`` (the schedule calls it after the last backward),
    with the division by the global token count left on the device.

    Megatron's version tests ``num_tokens > 0`` on the host, which waits for every launched
    kernel of the step and leaves the GPU idle while the host catches up (about 1% of a MoE step
    on an H100). Same groups, same order, same scaling; 0 tokens still scales by 1.
    """
    finalize_model_grads(model, None, pg_collection, **kwargs)
    if num_tokens is None:
        return
    if pg_collection is None:
        pp_group = ps.get_pipeline_model_parallel_group()
        dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    else:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    # The count is known on the last pipeline stage only.
    torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
    scaling = torch.where(num_tokens > 0, 1.0 / num_tokens, 1.0)
    for chunk in model:
        chunk.scale_gradients(scaling)


def split_microbatches(batch: dict[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Split a dict of ``[batch, ...]`` tensors into microbatches of ``micro_batch_size`` rows."""
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, Tensor)}
    if not sizes:
        raise ValueError(f"batch has no tensors to split; keys: {sorted(batch)}")
    batch_size = next(iter(sizes.values()))
    if any(size != batch_size for size in sizes.values()):
        raise ValueError(f"batch tensors disagree on the batch dimension: {sizes}")
    if batch_size % micro_batch_size:
        raise ValueError(
            f"the DataLoader batch size {batch_size} is not a multiple of micro_batch_size="
            f"{micro_batch_size}; make the batch size a multiple of it (drop_last=True helps)"
        )
    return [
        {k: v[i : i + micro_batch_size] if isinstance(v, Tensor) else v for k, v in batch.items()}
        for i in range(0, batch_size, micro_batch_size)
    ]


def forward_backward(
    forward_step: ForwardStep,
    chunks: Sequence[torch.nn.Module],
    batch: dict[str, Any],
    micro_batch_size: int,
    forward_only: bool,
) -> dict[str, Tensor]:
    """Run every microbatch of ``batch`` (forward, and backward unless ``forward_only``).

    Returns the reduced metrics: ``loss`` (token-weighted mean over the global batch) and
    ``num_tokens``, plus any extra sums the loss function reported, on every rank.
    """
    outputs = _run_schedule(forward_step, chunks, batch, micro_batch_size, forward_only=forward_only)
    return reduce_loss(outputs, device=batch["input_ids"].device)


def _run_schedule(forward_step, chunks, batch, micro_batch_size, **kwargs) -> list:
    """Megatron's schedule over the batch's microbatches; returns what the last stage collected."""
    microbatches = split_microbatches(batch, micro_batch_size)
    # Interleaved schedules pull from one iterator per virtual stage.
    data: Any = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=batch["input_ids"].shape[1],
        micro_batch_size=micro_batch_size,
        **kwargs,
    )


def reduce_loss(outputs: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """Weighted means over microbatches and the data-parallel group, the same on every rank.

    Each microbatch reports ``{"loss": tensor([loss_sum, num_tokens])}`` (last pipeline stage
    only), and may add more ``name: tensor([sum, count])`` entries (DPO's rewards, say); sums
    and counts are added over microbatches and data-parallel (and context-parallel) ranks, then
    broadcast from the last pipeline stage so every rank logs the same numbers. Returns each
    ``sum / count`` and ``num_tokens`` (the loss's count).
    """
    names = ["loss"] + sorted({k for output in outputs for k in output} - {"loss"})
    src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    if pipelined:  # only the last stage knows what the loss function reported
        box = [names]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        names = box[0]
    totals = torch.zeros(len(names), 2, dtype=torch.float32, device=device)
    for output in outputs:
        for i, name in enumerate(names):
            totals[i] += output[name].float()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if pipelined:
        torch.distributed.broadcast(totals, src=src, group=group)
    metrics = {name: totals[i, 0] / totals[i, 1].clamp(min=1) for i, name in enumerate(names)}
    metrics["num_tokens"] = totals[0, 1]
    return metrics


def forward_logits(
    chunks: Sequence[torch.nn.Module], batch: dict[str, Any], micro_batch_size: int, thd: bool = False
) -> Tensor:
    """Forward-only pass returning full-vocabulary logits ``[b, s, vocab]`` on every rank
    (``thd``: packed rows in THD format, see :func:`~lightning_megatron.models.gpt.prepare_inputs`)."""
    from megatron.core import tensor_parallel

    from lightning_megatron.models.gpt import prepare_inputs

    def step(data_iterator, chunk):
        # The same positions and attention mask (padding, packed samples) as in training.
        microbatch = next(data_iterator)
        packed = thd and "segment_ids" in microbatch
        shape = microbatch["input_ids"].shape
        inputs = prepare_inputs(microbatch, thd=packed)
        output = chunk(
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["attention_mask"],
            packed_seq_params=inputs["packed_seq_params"],
        )

        def gather(logits, non_loss_data=False):
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float())
            return logits.reshape(*shape, -1) if packed else logits  # THD's [1, b*s] back to [b, s]

        return output, gather

    pieces = _run_schedule(step, chunks, batch, micro_batch_size, forward_only=True, collect_non_loss_data=True)
    # Only the last stage has logits; it tells the others the vocabulary width, then sends them.
    device = batch["input_ids"].device
    width = torch.tensor([pieces[0].shape[-1] if pieces else 0], device=device)
    src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
    torch.distributed.broadcast(width, src=src, group=group)
    if pieces:
        logits = torch.cat(list(pieces), dim=0).contiguous()
    else:
        logits = torch.empty(batch["input_ids"].shape + (int(width.item()),), device=device)
    torch.distributed.broadcast(logits, src=src, group=group)
    return logits
