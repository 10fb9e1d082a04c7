"""LoRA on Megatron-Core's tensor-parallel linears, under any TP/SP/PP/EP layout.

A wrapped linear keeps its class's behaviour and its parameter names (``linear_qkv.weight`` stays
where it was, so base checkpoints and Hugging Face imports still fit) and gains two matrices,
``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``::

    y = W x + scale * B A dropout(x),        scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

Tensor parallelism follows the base layer, so no adapter ever needs the full weight:

- column-parallel (``W`` split on its output dim): ``A`` is whole on every TP rank and ``B`` is
  split like ``W``. ``h = A x`` is the same on every rank; its gradient is the sum over the ranks'
  ``B`` shards, so ``h`` passes through an identity whose backward all-reduces (with sequence
  parallelism: an all-gather of the sequence whose backward reduce-scatters).
- row-parallel (``W`` split on its input dim): ``A`` is split like ``W``, ``B`` is whole. ``A x``
  is a partial sum, all-reduced (reduce-scattered with sequence parallelism) before ``B``.

The wrapper is a class swap (as ``torch.nn.utils.parametrize`` does): the layer becomes an instance
of a subclass of its own class, so everything Megatron reads from it stays in place, and merging
folds ``scale * B A`` into each rank's own shard of ``W`` (no communication) and swaps back.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from lightning_megatron.models.init import sharded_tensors

# The Megatron linears LoRA can wrap; "all-linear" means all of them (never the output layer or
# the MoE router, as in peft). Hugging Face names map to the Megatron linear that holds them.
MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
HF_TO_MEGATRON = {
    "q_proj": "linear_qkv",
    "k_proj": "linear_qkv",
    "v_proj": "linear_qkv",
    "o_proj": "linear_proj",
    "gate_proj": "linear_fc1",
    "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
    "w1": "linear_fc1",
    "w3": "linear_fc1",
    "w2": "linear_fc2",
}
INITS = ("kaiming", "gaussian", "random")


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter is; saved in adapter checkpoints and written to PEFT's adapter_config.json.

    Args:
        r: rank of the update.
        alpha: scale numerator (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter's input.
        target_modules: ``"all-linear"``, Megatron names (``linear_qkv``, ``linear_proj``,
            ``linear_fc1``, ``linear_fc2``) or Hugging Face names (``q_proj``, ``gate_proj``...).
        target_regex: wrap the linears whose global name (``decoder.layers.3.mlp.linear_fc1``)
            matches this instead (then ``target_modules`` is ignored).
        use_rslora: rank-stabilized scale ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A kaiming-uniform, B zero: peft's default), ``"gaussian"`` (A normal
            with std 1/r, B zero) or ``"random"`` (B random too, so the adapter changes the
            output from the start: for tests).
        seed: adapter initialization seed (the same adapters under any layout).
    """

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    target_regex: str | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    seed: int = 42
    targets: tuple[str, ...] = field(default=(), compare=False)  # resolved Megatron names

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"LoRA init={self.init!r} is not one of {INITS}")
        modules = self.target_modules
        modules = (modules,) if isinstance(modules, str) else tuple(modules)
        object.__setattr__(self, "target_modules", modules)
        object.__setattr__(self, "targets", resolve_targets(modules))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        values["targets"] = list(self.targets)
        return values


def resolve_targets(modules: Sequence[str]) -> tuple[str, ...]:
    """Megatron linear names for ``target_modules`` (``"all-linear"``, Megatron or HF names)."""
    resolved: list[str] = []
    for name in modules:
        if name in ("all-linear", "all"):
            names = MEGATRON_TARGETS
        elif name in MEGATRON_TARGETS:
            names = (name,)
        elif name in HF_TO_MEGATRON:
            names = (HF_TO_MEGATRON[name],)
        else:
            raise ValueError(
                f"LoRA target_modules entry {name!r} is not a linear LoRA can wrap; use 'all-linear', "
                f"Megatron names {list(MEGATRON_TARGETS)} or Hugging Face names {sorted(HF_TO_MEGATRON)}"
            )
        resolved.extend(n for n in names if n not in resolved)
    return tuple(resolved)


# ----------------------------------------------------------------------------------- the layer
class LoRALinear:
    """Mixin put in front of a Megatron linear's class by :func:`add_lora`."""

    lora_config: LoRAConfig
    lora_parallel: str  # "column" or "row"
    lora_gated: bool  # fc1 of a gated MLP: B's rows are [gate; up] per TP rank
    lora_enabled: bool = True  # False inside adapters_disabled(): the base model alone

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return output, bias
        return output + self.lora_update(input_, gather_output=self._gathers_output(*args, **kwargs)), bias

    def _gathers_output(self, weight=None, runtime_gather_output=None) -> bool:
        if self.lora_parallel == "row":
            return False
        return self.gather_output if runtime_gather_output is None else runtime_gather_output

    def lora_update(self, x: torch.Tensor, gather_output: bool = False) -> torch.Tensor:
        group, sequence_parallel = self.tp_group, self.sequence_parallel and not self.explicit_expert_comm
        A, B = self.lora_A.weight, self.lora_B.weight
        if self.lora_parallel == "column":
            h = F.linear(self.lora_dropout(x), A)  # the same on every TP rank
            if sequence_parallel:
                h = gather_from_sequence_parallel_region(h, group=group)
            elif not self.explicit_expert_comm:
                h = copy_to_tensor_model_parallel_region(h, group=group)
            out = F.linear(h, B) * self.lora_config.scale
            return gather_from_tensor_model_parallel_region(out, group=group) if gather_output else out
        if self.lora_config.dropout:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # x is this rank's slice: its own mask
                x = self.lora_dropout(x)
        h = F.linear(x, A)
        if self.explicit_expert_comm:
            pass  # experts with expert-TP 1 (enforced by add_lora): nothing to reduce
        elif sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h, B) * self.lora_config.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # The base class describes weight/bias (and would call the adapters replicated);
        # re-describe the adapters with the TP axis of the one that is split.
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        split = {"lora_B.weight": 0} if self.lora_parallel == "column" else {"lora_A.weight": 1}
        adapters = {name: p for name, p in self.state_dict(prefix="", keep_vars=True).items() if "lora_" in name}
        state.update(
            make_sharded_tensors_for_checkpoint(
                adapters,
                prefix,
                split,
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group"),
            )
        )
        if self.lora_gated:
            key = f"{prefix}lora_B.weight"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
        return state

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold ``scale * B A`` into this rank's shard of the weight and become the base class again."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.lora_config.scale
        self.weight.add_(delta.to(self.weight.dtype))
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(self, name)
        self.__class__ = self.__class__.__mro__[2]  # (LoRA<Base>, LoRALinear, Base, ...)


_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (LoRALinear, base), {"__module__": __name__})
    return _CLASSES[base]


def _parallel_kind(module: torch.nn.Module) -> str | None:
    names = [cls.__name__ for cls in type(module).__mro__]
    if any("LayerNorm" in n and "Linear" in n for n in names):
        return "fused-norm"
    if any(n.endswith("ColumnParallelLinear") for n in names):
        return "column"
    if any(n.endswith("RowParallelLinear") for n in names):
        return "row"
    return None


def wrap_linear(module: torch.nn.Module, name: str, config: LoRAConfig, gated: bool) -> None:
    """Give one Megatron linear its adapters (in place)."""
    kind = _parallel_kind(module)
    if kind == "fused-norm":
        raise ValueError(
            f"LoRA cannot wrap {name} ({type(module).__name__}): Transformer Engine fuses the layer norm "
            "into this linear, so the adapter would not see the normalized input; train with "
            "MegatronStrategy(use_te=False) (the local layer spec) to use LoRA on it"
        )
    if kind is None:
        raise ValueError(f"LoRA cannot wrap {name}: {type(module).__name__} is not a tensor-parallel linear")
    if kind == "row" and not module.input_is_parallel:
        raise ValueError(f"LoRA cannot wrap {name}: a row-parallel linear with input_is_parallel=False")
    tp = torch.distributed.get_world_size(module.tp_group) if module.tp_group is not None else 1
    if module.explicit_expert_comm and tp > 1:
        raise ValueError(
            f"LoRA on expert linear {name} needs expert_tensor_parallel_size 1 (it is {tp}); "
            "set MegatronStrategy(etp=1)"
        )
    # A [r, in] and B [out, r] take the local shape of the weight's in and out dims: for a column
    # linear "out" is this rank's slice and "in" is whole, for a row linear the other way round.
    weight = module.weight
    out_local, in_local = weight.shape
    module.lora_A = torch.nn.Linear(in_local, config.r, bias=False, device=weight.device, dtype=weight.dtype)
    module.lora_B = torch.nn.Linear(config.r, out_local, bias=False, device=weight.device, dtype=weight.dtype)
    module.lora_dropout = torch.nn.Dropout(config.dropout) if config.dropout else torch.nn.Identity()
    split = module.lora_B.weight if kind == "column" else module.lora_A.weight
    set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
    for param in (module.lora_A.weight, module.lora_B.weight):
        # Expert adapters reduce over the expert-data-parallel group, like the expert weights.
        param.allreduce = getattr(weight, "allreduce", True)
        if getattr(module, "sequence_parallel", False) and not module.explicit_expert_comm and param is not split:
            # Each TP rank saw its own part of the sequence: the replicated adapter's gradient is
            # summed over TP ranks by finalize_model_grads (as for layer norms).
            param.sequence_parallel = True
    module.lora_config, module.lora_parallel, module.lora_gated = config, kind, gated
    module.__class__ = _lora_class(type(module))


def add_lora(chunks: Sequence[torch.nn.Module], config: LoRAConfig) -> list[str]:
    """Wrap the targeted linears of the model chunks; returns their global names (rank-local list).

    Raises when nothing matches on any rank's part of the model (the message lists what exists).
    """
    pattern = re.compile(config.target_regex) if config.target_regex else None
    wrapped, seen, fresh = [], set(), 0
    for name, module in named_linears(chunks):
        seen.add(name)
        if isinstance(module, LoRALinear):
            wrapped.append(name)  # the model is set up again (fit twice, or fit then predict): keep it
            continue
        short = name.rsplit(".", 1)[-1]
        if pattern.search(name) if pattern else short in config.targets:
            gated = short == "linear_fc1" and module.config.gated_linear_unit
            wrap_linear(module, name, config, gated)
            wrapped.append(name)
            fresh += 1
    found = torch.tensor([len(wrapped)], device=collective_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(found)
    if not found.item():
        examples = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in seen})
        raise ValueError(
            f"LoRA target_modules={list(config.target_modules)} target_regex={config.target_regex!r} matched "
            f"no linear; the model's linears are: {examples}"
        )
    if fresh:
        init_lora(chunks, config)
    return wrapped


def collective_device() -> torch.device:
    """Where a tensor for a collective on the default group must live (NCCL: the current GPU)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def named_linears(chunks: Sequence[torch.nn.Module]) -> Iterable[tuple[str, torch.nn.Module]]:
    """``(global name, module)`` of every linear in the transformer layers (pipeline offsets applied)."""
    for chunk in chunks:
        layers = getattr(getattr(chunk, "decoder", None), "layers", [])
        for layer in layers:
            for name, module in layer.named_modules():
                if _parallel_kind(module) is not None and hasattr(module, "weight"):
                    yield f"decoder.layers.{layer.layer_number - 1}.{name}", module


@torch.no_grad()
def init_lora(chunks: Sequence[torch.nn.Module], config: LoRAConfig) -> None:
    """Initialize every adapter from its *global* tensor, so the same seed gives the same adapters
    under any layout (see :mod:`lightning_megatron.models.init`)."""
    for sharded in sharded_tensors(chunks):
        if ".lora_" not in sharded.key:
            continue
        prepend = sharded.prepend_axis_num
        stream = f"{sharded.key}|{sharded.global_offset[:prepend]}"
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + zlib.crc32(stream.encode())) % 2**63)
        shape = sharded.global_shape[prepend:]
        is_a = ".lora_A." in sharded.key
        if is_a and config.init == "gaussian":
            full = torch.randn(shape, generator=generator) / config.r
        elif is_a or config.init == "random":
            bound = 1.0 / math.sqrt(shape[-1])  # kaiming_uniform(a=sqrt(5)), as nn.Linear and peft
            full = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            full = torch.zeros(shape)
        region = tuple(
            slice(o, o + n) for o, n in zip(sharded.global_offset[prepend:], sharded.local_shape, strict=True)
        )
        sharded.data.copy_(full[region])


def merge_lora(chunks: Sequence[torch.nn.Module]) -> int:
    """Fold every adapter into its base weight, in place, under any layout; returns how many."""
    merged = 0
    for chunk in chunks:
        for module in list(chunk.modules()):
            if isinstance(module, LoRALinear):
                module.merge_lora()
                merged += 1
    return merged


def lora_layers(chunks: Sequence[torch.nn.Module]) -> list[LoRALinear]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: every adapter is skipped inside the block (DPO's reference model)."""
    layers = lora_layers(chunks)
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            del layer.lora_enabled  # back to the class default


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key
