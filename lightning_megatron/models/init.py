"""Weight initialization that does not depend on the parallel layout.

Megatron-Core initializes each rank's shard from that rank's RNG stream, so the same seed gives a
different model under TP2 than under TP1. Here every tensor is drawn as its *global* tensor from
a generator seeded by (seed, the tensor's checkpoint key, its layer/expert index), and each rank
keeps its slice, found from the tensor's ``sharded_state_dict`` entry (the same metadata
dist_checkpointing uses). Same seed, same model, under any TP/PP/VPP/EP layout.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def sharded_tensors(chunks: Sequence[torch.nn.Module]) -> Iterator[ShardedTensor]:
    """Every ShardedTensor of the model chunks (factories expanded), views into the parameters."""

    def walk(obj):
        if isinstance(obj, dict):
            for value in obj.values():
                yield from walk(obj=value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from walk(value)
        elif isinstance(obj, ShardedTensorFactory):
            yield from walk(obj.build())
        elif isinstance(obj, ShardedTensor):
            yield obj

    for chunk in chunks:
        yield from walk(chunk.sharded_state_dict())


def _std_for(key: str, std: float, num_layers: int) -> float:
    # Megatron's scaled init: residual-branch output projections get std / sqrt(2 * layers).
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return std / math.sqrt(2.0 * num_layers)
    return std


@torch.no_grad()
def init_weights(chunks: Sequence[torch.nn.Module], seed: int, std: float, num_layers: int) -> None:
    """Fill the chunks' parameters: normal(0, std) matrices, zero biases, unit norm weights."""
    for sharded in sharded_tensors(chunks):
        key, data = sharded.key, sharded.data
        if key.endswith("_extra_state") or not isinstance(data, torch.Tensor) or not data.is_floating_point():
            continue
        if "norm" in key.rsplit(".", 1)[-1] or "norm." in key:
            data.fill_(1.0)
            continue
        if key.endswith("bias"):
            data.zero_()
            continue
        prepend = sharded.prepend_axis_num
        # Layer/expert index along prepended axes selects the generator; the rest is sliced.
        stream = f"{key}|{sharded.global_offset[:prepend]}"
        generator = torch.Generator(device=data.device).manual_seed(
            (seed * 1_000_003 + zlib.crc32(stream.encode())) % (2**63)
        )
        full_shape = sharded.global_shape[prepend:]
        full = torch.randn(full_shape, generator=generator, device=data.device, dtype=torch.float32)
        full.mul_(_std_for(key, std, num_layers))
        index = tuple(
            slice(offset, offset + size)
            for offset, size in zip(sharded.global_offset[prepend:], data.shape, strict=True)
        )
        data.copy_(full[index])
