"""Plan a parallel layout: which (tp, pp, cp, ep, dp, micro batch, recompute) fit a model on N GPUs.

For each candidate layout the planner checks it with :class:`~lightning_megatron.ParallelConfig`'s
own validation (the same checks the strategy runs) and estimates the peak memory of the busiest
pipeline stage: weights, gradient buffers, optimizer state (sharded over data parallel by the
distributed optimizer) and the activations kept for backward. docs/plan.md gives the formulas.

    lightning-megatron plan --model qwen2 --gpus 8 --gpu-memory 80 --seq-length 4096 --global-batch-size 64
    lightning-megatron plan --model path/to/hf --gpus 8 --gpu-memory 80 --seq-length 4096 \\
        --global-batch-size 64 --layout tp=2,pp=2,mbs=1,recompute=none    # one layout, as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_megatron.models.config import PRESETS, GPTConfig, RecomputeConfig
from lightning_megatron.parallel import ParallelConfig, _divisors

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}  # extra compute, for sorting
GIB = 2**30

# Bytes per parameter: (weights, gradient buffer, optimizer state) for Megatron's Adam.
# Mixed precision keeps fp32 master weights + exp_avg + exp_avg_sq (12 bytes); fp32 training
# updates the weights in place (8 bytes). Gradients are reduced in fp32 except with bf16-true.
BYTES_PER_PARAM = {
    "bf16-mixed": (2, 4, 12),
    "16-mixed": (2, 4, 12),
    "bf16-true": (2, 2, 12),
    "32-true": (4, 4, 8),
}


@dataclass(frozen=True)
class Layout:
    """One candidate layout. Sequence parallelism is on whenever ``tp > 1`` (the planner's
    choice: it only saves memory); ``recompute="full"`` means uniform, one layer per group;
    ``"selective"`` recomputes the MLP (or MoE) block: see :meth:`recompute_config`."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    micro_batch_size: int = 1
    recompute: Recompute = "none"

    @property
    def sp(self) -> bool:
        return self.tp > 1

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, sp=self.sp, micro_batch_size=self.micro_batch_size
        )

    def recompute_config(self, config: GPTConfig) -> RecomputeConfig | None:
        """The ``MegatronStrategy(recompute=...)`` this layout's estimate assumes."""
        if self.recompute == "full":
            return RecomputeConfig("full", "uniform", 1)
        if self.recompute == "selective":
            return RecomputeConfig("selective", modules=["moe" if config.is_moe else "mlp"])
        return None

    def label(self) -> str:
        return f"tp{self.tp} pp{self.pp} cp{self.cp} ep{self.ep} mbs{self.micro_batch_size} {self.recompute}"


@dataclass
class StageMemory:
    """Estimated bytes on one GPU of pipeline stage ``stage`` (each part in bytes)."""

    stage: int
    params: int  # parameters held by this rank (dense + expert)
    weights: int
    grads: int
    optimizer: int
    activations: int  # kept for backward, plus ``transient``
    microbatches_in_flight: int
    # Short-lived peaks inside ``activations``: one layer's recompute during backward, the
    # logits' gradient at the start of backward.
    transient: int = 0
    optimizer_step: int = 0  # temporaries of the optimizer step (after the activations are freed)

    @property
    def total(self) -> int:
        # Activations are freed before the optimizer step: the peak is the larger of the two phases.
        return self.weights + self.grads + self.optimizer + max(self.activations, self.optimizer_step)

    def to_dict(self) -> dict[str, Any]:
        parts = ("weights", "grads", "optimizer", "activations", "total")
        return {
            "stage": self.stage,
            "params": self.params,
            "microbatches_in_flight": self.microbatches_in_flight,
            "transient_bytes": self.transient,
            "optimizer_step_bytes": self.optimizer_step,
            **{f"{k}_gib": round(getattr(self, k) / GIB, 3) for k in parts},
            **{f"{k}_bytes": getattr(self, k) for k in parts},
        }


@dataclass
class Candidate:
    """A layout with its data-parallel size, its busiest stage's memory, or why it is invalid."""

    layout: Layout
    dp: int
    microbatches: int
    memory: StageMemory | None = None
    reason: str | None = None
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**dataclasses.asdict(self.layout), "sp": self.layout.sp, "dp": self.dp}
        out["microbatches"] = self.microbatches
        out["valid"] = self.valid
        if self.reason:
            out["reason"] = self.reason
        if self.memory is not None:
            out["peak"] = self.memory.to_dict()
            out["stages"] = [stage.to_dict() for stage in self.stages]
        return out


# ------------------------------------------------------------------------------ parameters
def layer_params(config: GPTConfig, tp: int, ep: int = 1) -> tuple[int, int]:
    """Parameters of one transformer layer held by one rank: ``(dense, expert)``. Experts are split
    over ``ep`` and over tensor parallelism: the planner's layouts keep expert-TP equal to ``tp``."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_query_groups * d
    qkv = q + 2 * kv
    dense = h + h * qkv // tp + q * h // tp + h  # input norm, qkv, proj, pre-MLP norm
    if config.add_qkv_bias:
        dense += qkv // tp
    if config.qk_layernorm:
        dense += 2 * d
    expert = 0
    if config.is_moe:
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        dense += config.num_experts * h  # the router is replicated
        expert = config.num_experts // ep * 3 * h * ffn // tp
        if config.moe_shared_expert_intermediate_size:
            dense += 3 * h * config.moe_shared_expert_intermediate_size // tp
            if config.moe_shared_expert_gate:
                dense += h
    else:
        dense += 3 * h * config.ffn_hidden_size // tp  # SwiGLU: gate+up (fused) and down
    return dense, expert


def stage_params(config: GPTConfig, tp: int, pp: int, stage: int, ep: int = 1) -> tuple[int, int]:
    """Parameters held by one rank of pipeline stage ``stage``: ``(dense, expert)``."""
    dense, expert = layer_params(config, tp, ep)
    layers = config.num_layers // pp
    dense, expert = dense * layers, expert * layers
    embedding = config.padded_vocab_size(tp) * config.hidden_size // tp
    if stage == 0:
        dense += embedding
    if stage == pp - 1:
        dense += config.hidden_size  # final norm
        # Untied: the output layer. Tied under pp > 1: the last stage keeps its own copy.
        if not config.tie_word_embeddings or pp > 1:
            dense += embedding
    return dense, expert


# ----------------------------------------------------------------------------- activations
# torch.nn.RMSNorm (the local spec's norm) runs its composite form: it keeps its input upcast to
# fp32 and the fp32 normalized tensor for backward, 8 bytes per element whatever the dtype.
NORM_SAVED_BYTES = 8


def layer_activation_bytes(
    config: GPTConfig, layout: Layout, seq_length: int, element_bytes: int, recompute: Recompute | None = None
) -> int:
    """Bytes one transformer layer keeps for backward, for one microbatch, on one rank.

    Local spec: torch ``RMSNorm``, torch SDPA (flash / memory-efficient kernels, no ``s x s``
    score matrix), SwiGLU, no dropout. Per token, ``e = element_bytes``, ``/sp`` = divided by tp
    under sequence parallelism:

    - two norms: ``2 * 8 * h /sp`` (fp32 input and normalized copies), and the QKV and gate/up
      linears' inputs (the norms' outputs) ``2 * e * h /sp``;
    - attention ``e * (q + 2kv + q) / tp`` on the fast path (``FusedQKVSelfAttention``, whose
      bias, head split and RoPE keep nothing for backward): the rotated Q and K, V, SDPA's output
      (the projection's input is a view of it); SDPA's fp32 log-sum-exp ``4 * heads / tp``; with
      qk_layernorm (Megatron's own attention path, which also keeps the fused QKV output, V a view
      of it) ``e * (q + kv) / tp`` more and ``8 * (q + kv) / tp`` for those norms;
    - MLP ``e * 5f / tp``: the gate/up output (2f), SiLU's output, the ``up + offset`` term
      Megatron's GLU multiplies by, and the down projection's input (f each).

    ``recompute="selective"`` recomputes the MLP (``RecomputeConfig("selective",
    modules=["mlp"])``, ``["moe"]`` for MoE): its terms go; ``"full"`` keeps only the layer input.
    """
    recompute = recompute or layout.recompute
    tp, h, d, e = layout.tp, config.hidden_size, config.head_dim, element_bytes
    q, kv = config.num_attention_heads * d, config.num_query_groups * d
    tokens = layout.micro_batch_size * seq_length // layout.cp
    h_sp = h // tp if layout.sp else h  # what a norm or a column-parallel linear keeps
    if recompute == "full":
        return e * tokens * h_sp
    per_token = 2 * NORM_SAVED_BYTES * h_sp + 2 * e * h_sp
    per_token += e * (2 * q + 2 * kv) // tp + 4 * config.num_attention_heads // tp
    if config.qk_layernorm:
        per_token += (e + NORM_SAVED_BYTES) * (q + kv) // tp
    if recompute != "selective":
        per_token += _moe_bytes(config, layout, e) if config.is_moe else e * 5 * config.ffn_hidden_size // tp
    return tokens * per_token


def _moe_bytes(config: GPTConfig, layout: Layout, e: int) -> int:
    # Approximate (balanced routing): each rank's experts see about topk x the tokens of its
    # sequence slice after the dispatch: a permuted copy of the input (h) and the SwiGLU
    # intermediates (5f, split over the expert-tensor-parallel ranks = tp); the shared expert
    # (5f / tp) and the fp32 router logits of this rank's tokens.
    ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
    tp, h = layout.tp, config.hidden_size
    routed = config.moe_router_topk * e * (2 * h + 5 * ffn // tp)
    shared = e * 5 * (config.moe_shared_expert_intermediate_size or 0) // tp
    router = 4 * config.num_experts // (tp if layout.sp else 1)
    return routed + shared + router


def logits_bytes(config: GPTConfig, layout: Layout, seq_length: int, element_bytes: int) -> tuple[int, int]:
    """The last stage's head: ``(kept, transient)`` bytes. Kept for backward: the final norm
    (``8h``), the output layer's input (``e*h``) and what the fast path's cross entropy
    (``lightning_megatron.models.kernels``) keeps: the logits in their own dtype and a fp32
    log-sum-exp and int64 target index per token; transient: the logits' gradient, written while
    the logits are still kept."""
    tokens = layout.micro_batch_size * seq_length // layout.cp
    h_sp = config.hidden_size // layout.tp if layout.sp else config.hidden_size
    vocab = config.padded_vocab_size(layout.tp) // layout.tp
    kept = tokens * ((NORM_SAVED_BYTES + element_bytes) * h_sp + element_bytes * vocab + 12)
    return kept, tokens * vocab * element_bytes


# ---------------------------------------------------------------------------------- memory
def stage_memory(
    config: GPTConfig,
    layout: Layout,
    world_size: int,
    seq_length: int,
    global_batch_size: int,
    stage: int,
    precision: str = "bf16-mixed",
    distributed_optimizer: bool = True,
) -> StageMemory:
    """Estimated memory of one rank of pipeline stage ``stage`` (no validity checks)."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision={precision!r}; choose one of {sorted(BYTES_PER_PARAM)}")
    weight_b, grad_b, optim_b = BYTES_PER_PARAM[precision]
    element_bytes = weight_b  # activations have the parameters' dtype
    tp, pp = layout.tp, layout.pp
    dp = world_size // (tp * pp * layout.cp)
    dense, expert = stage_params(config, tp, pp, stage, layout.ep)
    params = dense + expert
    if distributed_optimizer:
        # Dense state is sharded over data x context parallel, expert state over expert data parallel.
        expert_dp = world_size // (layout.ep * tp * pp)
        shard = math.ceil(dense / (dp * layout.cp)) + math.ceil(expert / expert_dp)
    else:
        shard = params
    optimizer = optim_b * shard
    microbatches = global_batch_size // (dp * layout.micro_batch_size)
    # 1F1B: stage i runs up to pp - i forwards before its first backward.
    in_flight = min(pp - stage, microbatches)
    per_layer = layer_activation_bytes(config, layout, seq_length, element_bytes)
    layers = config.num_layers // pp
    activations = in_flight * layers * per_layer
    # Backward recomputes one layer (or one MLP) at a time: what it saves exists for that layer.
    transient = layer_activation_bytes(config, layout, seq_length, element_bytes, recompute="none") - per_layer
    if stage == pp - 1:
        kept, cast = logits_bytes(config, layout, seq_length, element_bytes)
        activations += kept
        transient += cast
    activations += transient
    return StageMemory(
        stage=stage,
        params=params,
        weights=weight_b * params,
        grads=grad_b * params,
        optimizer=optimizer,
        # torch's foreach AdamW allocates sqrt(exp_avg_sq) for the whole shard, in fp32.
        optimizer_step=4 * shard,
        activations=activations,
        microbatches_in_flight=in_flight,
        transient=transient,
    )


def check_layout(
    config: GPTConfig,
    layout: Layout,
    world_size: int,
    seq_length: int,
    global_batch_size: int,
    use_te: bool = False,
) -> str | None:
    """Why ``layout`` cannot run this model on ``world_size`` GPUs, or ``None`` when it can."""
    parallel = layout.parallel_config()
    try:
        parallel.validate(world_size)
        parallel.validate_model(config)
        parallel.validate_sequence(seq_length)
    except ValueError as error:
        return str(error)
    if layout.cp > 1 and not use_te:
        return f"cp={layout.cp} needs Transformer Engine attention (use_te); the local spec runs cp=1"
    dp = parallel.dp(world_size)
    if global_batch_size % (dp * layout.micro_batch_size):
        return (
            f"global_batch_size={global_batch_size} is not a multiple of dp*micro_batch_size="
            f"{dp}*{layout.micro_batch_size}={dp * layout.micro_batch_size}"
        )
    return None


def estimate(
    config: GPTConfig,
    layout: Layout,
    world_size: int,
    seq_length: int,
    global_batch_size: int,
    gpu_memory_gib: float | None = None,
    precision: str = "bf16-mixed",
    distributed_optimizer: bool = True,
    use_te: bool = False,
    reserve_gib: float = 2.0,
) -> Candidate:
    """Check one layout and estimate the memory of each of its pipeline stages.

    The candidate is invalid when a check fails or, given ``gpu_memory_gib``, when the busiest
    stage needs more than ``gpu_memory_gib - reserve_gib`` (the reserve covers the CUDA context,
    communication buffers and allocator fragmentation, which the estimate does not model).
    """
    parallel = layout.parallel_config()
    dp = max(parallel.dp(world_size), 1)
    candidate = Candidate(layout, dp, global_batch_size // (dp * layout.micro_batch_size))
    candidate.reason = check_layout(config, layout, world_size, seq_length, global_batch_size, use_te)
    if candidate.reason:
        return candidate
    candidate.stages = [
        stage_memory(config, layout, world_size, seq_length, global_batch_size, s, precision, distributed_optimizer)
        for s in range(layout.pp)
    ]
    candidate.memory = max(candidate.stages, key=lambda m: m.total)
    if gpu_memory_gib is not None and candidate.memory.total > (gpu_memory_gib - reserve_gib) * GIB:
        candidate.reason = (
            f"needs {candidate.memory.total / GIB:.1f} GiB on stage {candidate.memory.stage}, over the "
            f"{gpu_memory_gib - reserve_gib:g} GiB budget ({gpu_memory_gib:g} GiB - {reserve_gib:g} GiB reserve)"
        )
    return candidate


def plan(
    config: GPTConfig,
    num_gpus: int,
    gpu_memory_gib: float,
    seq_length: int,
    global_batch_size: int,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    recompute: tuple[Recompute, ...] = ("none", "selective", "full"),
    precision: str = "bf16-mixed",
    distributed_optimizer: bool = True,
    use_te: bool = False,
    reserve_gib: float = 2.0,
) -> list[Candidate]:
    """Every (tp, pp, cp, ep, micro batch, recompute) on ``num_gpus`` GPUs, valid ones first.

    Valid layouts are sorted by what usually trains fastest: less recompute, a smaller
    model-parallel group (tp*pp*cp), fewer pipeline stages, then larger micro batches; invalid
    ones carry the reason. ``cp`` is tried only with ``use_te`` (the local attention has no cp).

    Example::

        best = plan(GPTConfig.preset("llama"), num_gpus=8, gpu_memory_gib=80, seq_length=4096,
                    global_batch_size=64)[0]
    """
    if gpu_memory_gib <= reserve_gib:
        raise ValueError(f"gpu_memory_gib={gpu_memory_gib} must exceed reserve_gib={reserve_gib} (GiB kept free)")
    if num_gpus < 1 or seq_length < 1 or global_batch_size < 1:
        raise ValueError(
            f"num_gpus={num_gpus}, seq_length={seq_length}, global_batch_size={global_batch_size} must be positive"
        )
    sizes = _divisors(num_gpus)
    cps = sizes if use_te else [1]
    eps = sizes if config.is_moe else [1]
    candidates = [
        estimate(
            config,
            Layout(tp, pp, cp, ep, mbs, rc),
            num_gpus,
            seq_length,
            global_batch_size,
            gpu_memory_gib,
            precision,
            distributed_optimizer,
            use_te,
            reserve_gib,
        )
        for tp in sizes
        for pp in sizes
        for cp in cps
        for ep in eps
        for mbs in micro_batch_sizes
        for rc in recompute
        if num_gpus % (tp * pp * cp) == 0
    ]

    def key(c: Candidate) -> tuple:
        lay = c.layout
        return (
            not c.valid,
            RECOMPUTE_COST[lay.recompute],
            lay.tp * lay.pp * lay.cp,
            lay.pp,
            -lay.micro_batch_size,
            lay.ep,
            c.memory.total if c.memory else 0,
        )

    return sorted(candidates, key=key)


# ------------------------------------------------------------------------------------- CLI
def load_model_config(model: str) -> GPTConfig:
    """A preset family name (``qwen2``), a Hugging Face model directory or a ``config.json``."""
    if model in PRESETS:
        return GPTConfig.preset(model)
    if Path(model).exists():
        return GPTConfig.from_hf(model)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path")


def parse_layout(text: str) -> Layout:
    """``"tp=2,pp=2,cp=1,ep=1,mbs=2,recompute=full"`` -> :class:`Layout` (omitted fields default)."""
    fields: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        key = {"mbs": "micro_batch_size"}.get(key.strip(), key.strip())
        if not sep or key not in {f.name for f in dataclasses.fields(Layout)}:
            raise ValueError(f"bad layout item {part!r}; expected e.g. tp=2,pp=2,cp=1,ep=1,mbs=1,recompute=none")
        fields[key] = value.strip() if key == "recompute" else int(value)
    if fields.get("recompute", "none") not in RECOMPUTE_COST:
        raise ValueError(f"recompute={fields['recompute']!r}; choose one of {list(RECOMPUTE_COST)}")
    return Layout(**fields)


def format_table(candidates: list[Candidate], limit: int | None = 20) -> str:
    valid = [c for c in candidates if c.valid]
    invalid = [c for c in candidates if not c.valid]
    header = f"{'tp':>3} {'pp':>3} {'cp':>3} {'ep':>3} {'dp':>4} {'mbs':>4} {'recompute':>9}"
    columns = f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}  GiB (busiest stage)"
    lines = [f"{len(valid)} valid layouts" + (f" (first {limit})" if limit and len(valid) > limit else ""), ""]
    lines.append(f"{header} {columns}")
    for c in valid[:limit]:
        m, lay = c.memory, c.layout
        parts = [m.weights, m.grads, m.optimizer, m.activations, m.total]
        lines.append(
            f"{lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {lay.ep:>3} {c.dp:>4} {lay.micro_batch_size:>4} "
            f"{lay.recompute:>9} " + " ".join(f"{p / GIB:>8.2f}" for p in parts)
        )
    # A divisibility problem holds for every micro batch and recompute choice: say it once.
    reasons: dict[tuple, list[Candidate]] = {}
    for c in invalid:
        lay = c.layout
        reasons.setdefault((lay.tp, lay.pp, lay.cp, lay.ep, c.reason), []).append(c)
    shown = list(reasons.items())[:limit]
    more = f" (first {limit} reasons)" if limit and len(reasons) > limit else ""
    lines += ["", f"{len(invalid)} invalid layouts{more}"]
    for (tp, pp, cp, ep, reason), group in shown:
        which = group[0].layout.label() if len(group) == 1 else f"tp{tp} pp{pp} cp{cp} ep{ep} ({len(group)} choices)"
        lines.append(f"  {which}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-megatron plan", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"preset ({', '.join(sorted(PRESETS))}) or HF dir/config.json")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True, help="samples per optimizer step")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"], choices=list(RECOMPUTE_COST))
    parser.add_argument("--precision", default="bf16-mixed", choices=sorted(BYTES_PER_PARAM))
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--use-te", action="store_true", help="Transformer Engine available: also try cp > 1")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB kept free per GPU (default 2)")
    parser.add_argument("--layout", help="estimate only this layout, as JSON: tp=2,pp=2,cp=1,ep=1,mbs=1,recompute=none")
    parser.add_argument("--json", action="store_true", help="print every candidate as JSON")
    parser.add_argument("--limit", type=int, default=20, help="rows per table (0: all)")


def run(args: argparse.Namespace) -> int:
    config = load_model_config(args.model)
    common = dict(
        precision=args.precision,
        distributed_optimizer=not args.no_distributed_optimizer,
        use_te=args.use_te,
        reserve_gib=args.reserve,
    )
    if args.layout:
        candidate = estimate(
            config,
            parse_layout(args.layout),
            args.gpus,
            args.seq_length,
            args.global_batch_size,
            args.gpu_memory,
            **common,
        )
        print(json.dumps(candidate.to_dict(), indent=2))
        return 0 if candidate.valid else 1
    candidates = plan(
        config,
        args.gpus,
        args.gpu_memory,
        args.seq_length,
        args.global_batch_size,
        tuple(args.micro_batch_sizes),
        tuple(args.recompute),
        **common,
    )
    if args.json:
        print(json.dumps([c.to_dict() for c in candidates], indent=2))
    else:
        print(format_table(candidates, args.limit or None))
    return 0 if any(c.valid for c in candidates) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
