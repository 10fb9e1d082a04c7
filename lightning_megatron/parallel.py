"""ParallelConfig: how a model is split over processes, and the checks that say when it cannot be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_megatron.models.config import GPTConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelConfig:
    """Megatron-Core's parallel layout.

    Args:
        tp: tensor-parallel size (splits attention heads and MLP columns).
        pp: pipeline-parallel size (splits layers into stages).
        vpp: virtual pipeline stages per rank (interleaved 1F1B); ``None`` for plain 1F1B.
        cp: context-parallel size (splits the sequence; needs Transformer Engine attention).
        ep: expert-parallel size (splits MoE experts).
        etp: expert tensor-parallel size; ``None`` means the same as ``tp``.
        sp: sequence parallel (shards norms/dropout activations over the TP group; needs tp > 1).
        micro_batch_size: samples per microbatch; the DataLoader batch is split into these.

    The data-parallel size is what is left: ``world_size // (tp * pp * cp)``.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    sp: bool = False
    micro_batch_size: int = 1

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, world_size: int) -> None:
        """Check the layout against the number of processes; raise ``ValueError`` naming the fix."""
        for name in ("tp", "pp", "cp", "ep", "micro_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"etp={self.etp!r} must be a positive integer or None (same as tp)")
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"tp*pp*cp={self.tp}*{self.pp}*{self.cp}={model_parallel} does not divide the "
                f"world size {world_size}; use devices*num_nodes that is a multiple of "
                f"{model_parallel}, or pick tp, pp, cp whose product divides {world_size} "
                f"(divisors: {_divisors(world_size)})"
            )
        expert_world = self.ep * self.expert_tp * self.pp
        if world_size % expert_world:
            per_stage = world_size // self.pp
            choices = [d for d in _divisors(per_stage) if per_stage % (d * self.expert_tp) == 0]
            raise ValueError(
                f"ep*etp*pp={self.ep}*{self.expert_tp}*{self.pp}={expert_world} does not divide the "
                f"world size {world_size}; choose ep from "
                f"{choices}"
            )
        if self.sp and self.tp == 1:
            raise ValueError("sp=True (sequence parallel) needs tp > 1; set tp >= 2 or sp=False")
        if self.vpp is not None:
            if self.vpp < 1:
                raise ValueError(f"vpp={self.vpp!r} must be >= 1 or None")
            if self.pp == 1:
                raise ValueError(f"vpp={self.vpp} needs pipeline parallelism; set pp >= 2 or vpp=None")

    def validate_model(self, config: GPTConfig) -> None:
        """Check the layout against a model's shape (heads, query groups, layers, experts)."""
        checks = [
            ("tp", self.tp, "num_attention_heads", config.num_attention_heads),
            ("tp", self.tp, "num_query_groups", config.num_query_groups),
        ]
        if config.num_experts:
            checks.append(("ep", self.ep, "num_experts", config.num_experts))
        for name, size, field, value in checks:
            if value % size:
                raise ValueError(f"{name}={size} does not divide {field}={value}; choose {name} in {_divisors(value)}")
        stages = self.pp * (self.vpp or 1)
        if config.num_layers % stages:
            label = f"pp*vpp={self.pp}*{self.vpp}={stages}" if self.vpp else f"pp={self.pp}"
            raise ValueError(
                f"{label} does not divide num_layers={config.num_layers}; "
                f"choose pp*vpp in {_divisors(config.num_layers)}"
            )
        if config.num_experts and self.tp > 1 and not self.sp:
            raise ValueError(
                f"an MoE model with tp={self.tp} needs sequence parallelism (Megatron-Core "
                "requires it for MoE under tensor parallelism); set sp=True"
            )
        if self.ep > 1 and not config.num_experts:
            raise ValueError(f"ep={self.ep} needs an MoE model (num_experts > 0); set ep=1")

    def validate_sequence(self, seq_length: int) -> None:
        """Check a batch's sequence length against cp and sp."""
        if self.cp > 1 and seq_length % (2 * self.cp):
            raise ValueError(
                f"cp={self.cp} needs the sequence length divisible by 2*cp={2 * self.cp} "
                f"(context parallel splits it into 2*cp load-balanced chunks); got {seq_length}: "
                f"pad sequences to a multiple of {2 * self.cp}"
            )
        if self.sp and seq_length % self.tp:
            raise ValueError(
                f"sp=True with tp={self.tp} needs the sequence length divisible by tp; got "
                f"{seq_length}: pad sequences to a multiple of {self.tp}"
            )
