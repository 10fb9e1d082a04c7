"""ParallelConfig: how a model is split over processes, and the checks that say when it cannot be;
rank shortcuts and a rank-aware logger for code that runs inside a MegatronStrategy fit.

    from lightning_megatron import parallel

    if parallel.tp_rank() == 0 and parallel.pp_rank() == parallel.pp_size() - 1: ...
    parallel.rank_logger(__name__).info_rank_0("loaded")  # once; info_all_ranks: every rank
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    def megatron_sizes(self) -> dict[str, int | None]:
        """The sizes under Megatron's names, as ``initialize_model_parallel`` and
        ``TransformerConfig`` both take them."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
        )

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


# ------------------------------------------------------------------------ rank shortcuts
# Valid once MegatronStrategy has set up its parallel state (inside fit/validate/predict and the
# hooks they call). tp/pp/cp/ep: the tensor-, pipeline-, context- and expert-parallel groups this
# rank belongs to; dp: the data-parallel group of the dense parameters (without context parallel).


def _state():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "Megatron's parallel state is not set up; call the rank helpers after MegatronStrategy "
            "has set up (in LightningModule/callback hooks during fit, validate or predict)"
        )
    return ps


def tp_size() -> int:
    return _state().get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return _state().get_tensor_model_parallel_rank()


def tp_group():
    return _state().get_tensor_model_parallel_group()


def pp_size() -> int:
    return _state().get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    return _state().get_pipeline_model_parallel_rank()


def pp_group():
    return _state().get_pipeline_model_parallel_group()


def dp_size() -> int:
    return _state().get_data_parallel_world_size()


def dp_rank() -> int:
    return _state().get_data_parallel_rank()


def dp_group():
    return _state().get_data_parallel_group()


def cp_size() -> int:
    return _state().get_context_parallel_world_size()


def cp_rank() -> int:
    return _state().get_context_parallel_rank()


def cp_group():
    return _state().get_context_parallel_group()


def ep_size() -> int:
    return _state().get_expert_model_parallel_world_size()


def ep_rank() -> int:
    return _state().get_expert_model_parallel_rank()


def ep_group():
    return _state().get_expert_model_parallel_group()


def global_rank() -> int:
    """This process's global rank, 0 before (or without) torch.distributed."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_prefix() -> str:
    """``[rank 3 tp1 pp1 dp0]``: the global rank and its coordinates in the layout (only the
    dimensions larger than one); ``[rank 3]`` before the parallel state exists."""
    parts = [f"rank {global_rank()}"]
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        for name, size, index in (
            ("tp", tp_size, tp_rank),
            ("pp", pp_size, pp_rank),
            ("cp", cp_size, cp_rank),
            ("ep", ep_size, ep_rank),
            ("dp", dp_size, dp_rank),
        ):
            if size() > 1:
                parts.append(f"{name}{index()}")
    return "[" + " ".join(parts) + "]"


class RankLogger(logging.LoggerAdapter):
    """A logger that prefixes each message with :func:`rank_prefix` and logs either on every rank
    or on global rank 0 only, megatron-wrap style.

    Example::

        log = rank_logger(__name__)
        log.info_rank_0("starting")          # once per job
        log.warning_all_ranks("slow batch")  # every rank, e.g. "[rank 3 tp1 dp1] slow batch"
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[str, Any]:
        return f"{rank_prefix()} {msg}", kwargs

    def _rank_0(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if global_rank() == 0:
            self.log(level, msg, *args, **kwargs)

    def debug_rank_0(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._rank_0(logging.DEBUG, msg, *args, **kwargs)

    def info_rank_0(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._rank_0(logging.INFO, msg, *args, **kwargs)

    def warning_rank_0(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._rank_0(logging.WARNING, msg, *args, **kwargs)

    def error_rank_0(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._rank_0(logging.ERROR, msg, *args, **kwargs)

    debug_all_ranks = logging.LoggerAdapter.debug
    info_all_ranks = logging.LoggerAdapter.info
    warning_all_ranks = logging.LoggerAdapter.warning
    error_all_ranks = logging.LoggerAdapter.error


def rank_logger(name: str = "lightning_megatron") -> RankLogger:
    """A :class:`RankLogger` over ``logging.getLogger(name)``."""
    return RankLogger(logging.getLogger(name), {})
