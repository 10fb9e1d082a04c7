"""The MoE fast path: stacked expert weights and a token dispatcher without host syncs.

Profiled on one H100 (docs/benchmarks.md), Megatron-Core's local MoE layer is bound by the host,
not the GPU: every expert weight is its own parameter (32 experts x 2 weights x 16 layers = 1,024
parameters, each with an autograd accumulator, a DDP hook and a gradient add per microbatch), and
the dispatcher reads the tokens-per-expert counts back to the host in every layer, so the CPU can
never run ahead of the GPU. Two replacements fix that without changing a checkpoint:

- :class:`StackedExperts` keeps the routed experts as two ``[experts, out, in]`` parameters run by
  ``torch._grouped_mm``. Its torch_dist checkpoint entries are the per-expert tensors of
  Megatron's ``SequentialMLP`` (same keys, same global shapes), so checkpoints, HF import/export
  and layout-independent initialization carry over between the two.
- :func:`use_sorted_dispatch` gives Megatron's MoE layers a :class:`SortedTokenDispatcher` when no
  token leaves the rank (tensor x expert parallel size 1) and routing is dropless: the order by
  expert comes from cumsums and scatters on the device (no sort, no host sync), and each token's
  rows are gathered back and summed (instead of atomic scatter-adds).

:class:`GroupedExperts` (Megatron's per-expert ``SequentialMLP``, run as grouped GEMMs) is what the
spec builds where stacked experts do not apply, and what LoRA turns stacked experts back into.
"""

from __future__ import annotations

import functools
import types
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from torch import Tensor

from lightning_megatron.models.expert_kernels import expert_gemm, fused_wgrad_supported, weighted_swiglu
from lightning_megatron.models.kernels import HAS_FP32_OUT_GEMM, compiled_on_cuda

_EXTRA_STATE = "sequential_mlp_extra_state."


def _grouped_swiglu_experts(config: TransformerConfig) -> bool:
    """Whether the experts are what the grouped-GEMM paths compute: bias-free SwiGLU in 16/32-bit."""
    return (
        hasattr(torch, "_grouped_mm")
        and config.gated_linear_unit
        and config.activation_func is F.silu
        and not config.add_bias_linear
        and not (config.fp8 or config.fp4)
        and not config.moe_apply_probs_on_input
        and config.activation_func_clamp_value is None
        and config.glu_linear_offset == 0
    )


def stacked_experts_supported(config: TransformerConfig) -> bool:
    """Whether :class:`StackedExperts` can stand in for ``SequentialMLP`` under ``config``."""
    return (
        bool(config.num_moe_experts)
        and _grouped_swiglu_experts(config)
        and (config.expert_tensor_parallel_size or 1) == 1
        and config.moe_latent_size is None
    )


def grouped_mm_supported(x: Tensor) -> bool:
    """``torch._grouped_mm`` runs bf16 on CUDA sm90+, and on CPU."""
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and _cuda_major(x.device.index) >= 9
    return x.device.type == "cpu"


@functools.cache
def _cuda_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _weighted_swiglu(
    intermediate: Tensor, probs: Tensor, config: TransformerConfig, dtype: torch.dtype, one_pass: bool = False
) -> Tensor:
    # fc1's output is [gate | up]; each row is weighted by its routing probability.
    if one_pass and config.bias_activation_fusion and intermediate.dim() == 2:
        return weighted_swiglu(intermediate, probs)  # one-pass backward (expert_kernels.py)
    if config.bias_activation_fusion:
        return weighted_bias_swiglu_impl(intermediate, None, probs)
    gate, up = torch.chunk(intermediate, 2, dim=-1)
    return (F.silu(gate) * up * probs).to(dtype)


def _grouped_experts_forward(
    hidden: Tensor,
    fc1: Tensor,
    fc2: Tensor,
    tokens_per_expert: Tensor,
    probs: Tensor,
    config,
    fuse_wgrad: bool = False,
    one_pass_swiglu: bool = False,
):
    """Both expert GEMMs over all experts at once: ``fc1 [E, 2f, h]``, ``fc2 [E, h, f]``."""
    # Exclusive ends of each expert's rows; they stay on the device (no host sync).
    offsets = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
    intermediate = expert_gemm(hidden, fc1, offsets, fuse_wgrad)
    intermediate = _weighted_swiglu(intermediate, probs.unsqueeze(-1), config, hidden.dtype, one_pass_swiglu)
    return expert_gemm(intermediate, fc2, offsets, fuse_wgrad)


class GroupedExperts(SequentialMLP):
    """Megatron's ``SequentialMLP`` experts (same parameters, checkpoints and HF mapping), run as
    two ``torch._grouped_mm`` calls over all local experts instead of a Python loop of small GEMMs.

    The per-expert weights are stacked for each forward (a copy of the expert weights, cheap next
    to the GEMMs); gradients flow back to each expert's own parameter, so Megatron DDP's gradient
    buffers and the distributed optimizer see the usual parameters. Falls back to the loop where
    grouped GEMMs are unavailable (CUDA before Hopper or non-bf16 CUDA tensors), with biases,
    tensor-parallel experts, non-SwiGLU activations or wrapped expert linears (LoRA). Where none of
    that applies, the spec builds :class:`StackedExperts` instead (LoRA comes back here).
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, grouped: bool = True) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.grouped = grouped and _grouped_swiglu_experts(self.config) and self.tp_group.size() == 1

    def _grouped_supported(self, hidden: Tensor) -> bool:
        if not self.grouped or self.num_local_experts == 1:
            return False
        # Wrapped expert linears (LoRA swaps in a subclass) must run their own forward.
        if any(
            type(e.linear_fc1) is not ColumnParallelLinear or type(e.linear_fc2) is not RowParallelLinear
            for e in self.local_experts
        ):
            return False
        return grouped_mm_supported(hidden)

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
        hidden = permuted_local_hidden_states
        if not self._grouped_supported(hidden):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])
        return _grouped_experts_forward(hidden, fc1, fc2, tokens_per_expert, permuted_probs, self.config), None


class StackedExperts(MegatronModule):
    """Routed SwiGLU experts as two stacked weights: ``fc1_weight [experts, 2 * ffn, hidden]``
    (gate rows, then up rows, as in each ``SequentialMLP`` expert's ``linear_fc1``) and
    ``fc2_weight [experts, hidden, ffn]``, with expert-tensor-parallel size 1.

    One parameter per weight kind means one gradient and one DDP hook per layer instead of one per
    expert, and no per-forward stacking. Same forward contract as Megatron's expert modules:
    tokens sorted by expert, their counts per expert, and their routing probabilities.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None, pg_collection=None):
        super().__init__(config=config)
        if not stacked_experts_supported(config):
            raise ValueError(
                "StackedExperts needs bias-free SwiGLU experts with expert_tensor_parallel_size 1 and "
                "no fp8/fp4; build the model with fused_kernels=False for other expert layouts"
            )
        self.num_local_experts = num_local_experts
        self.submodules = submodules  # kept so LoRA can rebuild per-expert linears (unstack)
        self.pg_collection = pg_collection
        self.ep_group, self.dp_group = pg_collection.ep, pg_collection.expt_dp
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        empty = dict(dtype=config.params_dtype, device=device)
        self.fc1_weight = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden, **empty))
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, **empty))
        for weight, init in ((self.fc1_weight, config.init_method), (self.fc2_weight, config.output_layer_init_method)):
            if config.perform_initialization:
                with torch.no_grad():
                    for expert in weight:
                        init(expert)
            # As Megatron marks its expert linears: split over expert-TP (size 1 here) along the
            # output dimension, and reduced over the expert-data-parallel group under EP.
            set_tensor_model_parallel_attributes(weight, True, 1, 1)
            weight.allreduce = config.expert_model_parallel_size == 1
        # Megatron's flag for weight gradients accumulated into main_grad by the GEMM (see
        # expert_kernels.py); an attribute, so that it can be turned off per layer.
        self.fuse_wgrad = config.gradient_accumulation_fusion
        self.one_pass_swiglu = True  # expert_kernels.weighted_swiglu where Megatron's fused one would run
        self.register_load_state_dict_post_hook(self._drop_extra_states)

    def weights_into_main_grad(self) -> list[torch.nn.Parameter]:
        """The weights whose backward adds their gradient into ``main_grad`` itself."""
        weights = (self.fc1_weight, self.fc2_weight)
        return [w for w in weights if self.fuse_wgrad and fused_wgrad_supported(w)]

    def forward(self, hidden: Tensor, tokens_per_expert: Tensor, probs: Tensor) -> tuple[Tensor, None]:
        if grouped_mm_supported(hidden):
            return _grouped_experts_forward(
                hidden,
                self.fc1_weight,
                self.fc2_weight,
                tokens_per_expert,
                probs,
                self.config,
                self.fuse_wgrad,
                self.one_pass_swiglu,
            ), None
        # Devices without grouped GEMMs (CUDA before Hopper, fp16/fp32 on CUDA): one GEMM pair per expert.
        outputs = []
        counts = tokens_per_expert.tolist()
        for expert, (x, p) in enumerate(zip(hidden.split(counts), probs.split(counts), strict=True)):
            intermediate = _weighted_swiglu(x @ self.fc1_weight[expert].t(), p.unsqueeze(-1), self.config, x.dtype)
            outputs.append(intermediate @ self.fc2_weight[expert].t())
        return torch.cat(outputs), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """``SequentialMLP``'s entries: one ``experts.linear_fc{1,2}.weight`` tensor per expert along
        a prepended expert axis, built as views of the stacked weights (a factory, so the
        distributed optimizer's states of the stacked parameter map the same way)."""
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("StackedExperts does not write singleton_local_shards checkpoints")
        first = self.ep_group.rank() * self.num_local_experts
        num_global = self.ep_group.size() * self.num_local_experts
        replica_id = (0, 0, self.dp_group.rank())
        expert_axis = len(sharded_offsets)

        def build(key: str, stacked: Tensor, replica_id, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError("flattened optimizer states of stacked experts are not supported")
            return [
                ShardedTensor.from_rank_offsets(
                    key,
                    stacked[i],
                    *sharded_offsets,
                    (expert_axis, first + i, num_global),
                    replica_id=replica_id,
                    prepend_axis_num=expert_axis + 1,
                )
                for i in range(self.num_local_experts)
            ]

        def merge(loaded: list[Tensor]) -> Tensor:
            return torch.stack(loaded)

        # The checkpoint key SequentialMLP writes its experts under: it replaces
        # "...mlp.experts.local_experts.N." by "...mlp.experts.experts.".
        state = {
            f"{prefix}{name}_weight": ShardedTensorFactory(
                f"{prefix}experts.linear_{name}.weight", getattr(self, f"{name}_weight"), build, merge, replica_id
            )
            for name in ("fc1", "fc2")
        }
        # SequentialMLP's linears also write an (empty) extra state per expert; a checkpoint must
        # have them to load into SequentialMLP experts.
        for i in range(self.num_local_experts):
            offsets = (*sharded_offsets, (expert_axis, first + i, num_global))
            for linear in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}{_EXTRA_STATE}{first + i}.{linear}"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{linear}._extra_state", offsets, replica_id
                )
        return state

    def _drop_extra_states(self, module, incompatible_keys) -> None:
        # The empty extra states written for SequentialMLP (above) have no tensor to load into.
        unexpected = incompatible_keys.unexpected_keys
        unexpected[:] = [key for key in unexpected if _EXTRA_STATE not in key]

    def unstacked(self):
        """The same experts as a per-expert module (``GroupedExperts``) with these weights, for
        code that needs one linear per expert (LoRA adapters on experts)."""
        experts = GroupedExperts(self.num_local_experts, self.config, self.submodules, self.pg_collection)
        experts.to(self.fc1_weight.device)
        with torch.no_grad():
            for i, expert in enumerate(experts.local_experts):
                expert.linear_fc1.weight.copy_(self.fc1_weight[i])
                expert.linear_fc2.weight.copy_(self.fc2_weight[i])
        return experts


class _ExpandRows(torch.autograd.Function):
    """``x[rows_token]`` (each token copied to its k rows); backward sums each token's k rows,
    read in token order through ``token_rows`` (a gather and a sum, instead of atomic adds)."""

    @staticmethod
    def forward(ctx, x: Tensor, rows_token: Tensor, token_rows: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_rows)
        ctx.k = k
        return x.index_select(0, rows_token)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (token_rows,) = ctx.saved_tensors
        return _sum_rows(grad, token_rows, ctx.k), None, None, None


class _SumRows(torch.autograd.Function):
    """The inverse of :class:`_ExpandRows`: each token's k expert rows summed."""

    @staticmethod
    def forward(ctx, y: Tensor, rows_token: Tensor, token_rows: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(rows_token)
        return _sum_rows(y, token_rows, k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows_token,) = ctx.saved_tensors
        return grad.index_select(0, rows_token), None, None, None


@compiled_on_cuda
def _sum_rows(rows: Tensor, token_rows: Tensor, k: int) -> Tensor:
    # One rounding per token (the sum accumulates in fp32), where scatter-adds round k times.
    # Compiled, the gather and the sum are one kernel: the k x hidden rows are read once and
    # never written back.
    return rows.index_select(0, token_rows).view(-1, k, rows.shape[-1]).sum(1)


def _expert_order(routing_map: Tensor, probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where each of the ``tokens * k`` expert rows comes from, for a routing map with exactly
    ``k`` True per row: ``(rows_token, token_rows, permuted_probs, tokens_per_expert)``.

    Rows are in Megatron's order (by expert, then by token); ``token_rows`` lists each token's
    rows in token order (its experts ascending). Cumsums and scatters only: no sort, no host sync.
    """
    tokens, experts = routing_map.shape
    rows = tokens * k
    # A True entry's row is its rank in the expert-major map; False entries are scattered to a
    # dump slot (rows) that is cut off. Every other slot is written, so nothing is initialized.
    expert_major = routing_map.t().reshape(-1)
    dest = torch.where(expert_major, expert_major.cumsum(0) - 1, rows)
    position = torch.arange(tokens * experts, device=dest.device)
    slots = torch.empty(rows + 1, dtype=torch.long, device=dest.device)
    rows_token = slots.scatter_(0, dest, position % tokens)[:rows]
    rows_expert = torch.empty_like(slots).scatter_(0, dest, position // tokens)[:rows]
    permuted_probs = probs.new_empty(rows + 1).scatter_(0, dest, probs.t().reshape(-1))[:rows]
    # Each token's rows in token order: slot token * k + j for its j-th expert.
    nth_expert_of_token = (routing_map.cumsum(1) - 1).reshape(-1)
    slot = rows_token * k + nth_expert_of_token[rows_token * experts + rows_expert]
    token_rows = torch.empty_like(slot).scatter_(0, slot, torch.arange(rows, device=slot.device))
    return rows_token, token_rows, permuted_probs, routing_map.sum(dim=0)


class SortedTokenDispatcher(MoEAllGatherTokenDispatcher):
    """Megatron's all-gather dispatcher for the case where it gathers nothing (TP x EP size 1),
    without its host syncs: every token has exactly ``topk`` experts, so the number of expert
    rows is known and the permutation is computed on the device.

    Rows are ordered as Megatron's ``permute`` orders them (by expert, then by token), so the
    experts see the same inputs; the combine sums each token's rows in one pass. With a padding
    mask (tokens routed nowhere) it is Megatron's all-gather dispatcher.
    """

    topk_per_token = True  # False while a padding mask drops tokens (see use_sorted_dispatch)
    rows_token: Tensor | None = None

    def dispatch_postprocess(self, hidden_states: Tensor, probs: Tensor):
        if not self.topk_per_token:
            return super().dispatch_postprocess(hidden_states, probs)
        k = self.router_topk
        self.hidden_shape_before_permute = hidden_states.shape
        # Not compiled: measured neutral on the benchmark step (twice), and compiling for a new
        # token count would sync the host.
        self.rows_token, self.token_rows, permuted_probs, tokens_per_expert = _expert_order(self.routing_map, probs, k)
        permuted = _ExpandRows.apply(hidden_states, self.rows_token, self.token_rows, k)
        self.routing_map = None
        return permuted, tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        if self.rows_token is None:
            return super().combine_preprocess(hidden_states)
        out = _SumRows.apply(hidden_states, self.rows_token, self.token_rows, self.router_topk)
        self.rows_token = self.token_rows = None
        return out


def use_sorted_dispatch(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` whose tokens never leave the rank (TP x EP size 1) and
    whose routing is dropless a :class:`SortedTokenDispatcher`; returns how many it changed.

    With nothing to communicate every Megatron dispatcher computes the same permutation, so this
    changes speed, not results (up to the rounding of the combine's sum).
    """
    changed = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer) or isinstance(layer.token_dispatcher, SortedTokenDispatcher):
            continue
        config, dispatcher = layer.config, layer.token_dispatcher
        local = dispatcher.tp_size * dispatcher.ep_size == 1
        dropless = config.moe_expert_capacity_factor is None and not config.moe_pad_expert_input_to_capacity
        if not (local and dropless) or config.moe_shared_expert_overlap:
            continue
        groups = SimpleNamespace(ep=dispatcher.ep_group, expt_tp=dispatcher.tp_group, tp_ep=dispatcher.tp_ep_group)
        layer.token_dispatcher = SortedTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, config, groups
        )
        layer.register_forward_pre_hook(_note_padding_mask, with_kwargs=True)
        changed += 1
    return changed


def use_tensor_core_router(model: torch.nn.Module) -> int:
    """Compute the fp32 router logits of ``model``'s MoE layers (``moe_router_dtype="fp32"``) on
    the bf16 tensor cores; returns how many routers it changed.

    Megatron casts the bf16 input and weight to fp32 and runs an fp32 GEMM (three per layer and
    microbatch, with fp32 copies of the input): about 2% of a Qwen2-MoE step on an H100. The
    products of two bf16 numbers are exact in fp32, so a bf16 GEMM that accumulates and returns
    fp32 computes the same logits. The backward splits the fp32 logit gradient into two bf16
    parts (16 of fp32's 24 significant bits) for the same reason.
    """
    changed = 0
    for router in model.modules():
        if isinstance(router, TopKRouter) and router.config.moe_router_dtype == "fp32" and router.bias is None:
            router.gating = types.MethodType(_tensor_core_gating, router)
            changed += 1
    return changed


def _tensor_core_gating(router: TopKRouter, x: Tensor) -> Tensor:
    if x.is_cuda and router.weight.is_cuda and x.dtype == router.weight.dtype == torch.bfloat16 and HAS_FP32_OUT_GEMM:
        return _Fp32Logits.apply(x, router.weight)
    return type(router).gating(router, x)


class _Fp32Logits(torch.autograd.Function):
    """``x @ w.T`` in fp32 from bf16 ``x`` and ``w``, on the tensor cores (see
    :func:`use_tensor_core_router`); gradients in the inputs' dtype, as Megatron's."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        flat = x.reshape(-1, x.shape[-1])
        return torch.ops.aten.mm.dtype(flat, w.t(), torch.float32).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad = grad.reshape(-1, w.shape[0])
        high = grad.to(x.dtype)
        low = (grad - high.float()).to(x.dtype)
        both = torch.cat([high, low], dim=1)
        # grad_x = (high + low) @ w as one GEMM over the doubled inner dimension: one rounding.
        grad_x = both.mm(torch.cat([w, w], dim=0))
        parts = torch.ops.aten.mm.dtype(both.t(), x.reshape(-1, x.shape[-1]), torch.float32)
        grad_w = parts[: w.shape[0]] + parts[w.shape[0] :]
        return grad_x.view_as(x), grad_w.to(w.dtype)


def _note_padding_mask(layer: MoELayer, args: tuple, kwargs: dict) -> None:
    # A padding mask removes tokens from the routing map (fewer than topk rows per token).
    layer.token_dispatcher.topk_per_token = kwargs.get("padding_mask") is None


def unstack_experts(chunks) -> int:
    """Replace every :class:`StackedExperts` in ``chunks`` by its per-expert equivalent (same
    weights); returns how many. LoRA calls this: expert adapters wrap one linear per expert."""
    changed = 0
    for chunk in chunks:
        for layer in chunk.modules():
            if isinstance(layer, MoELayer) and isinstance(layer.experts, StackedExperts):
                layer.experts = layer.experts.unstacked()
                changed += 1
    return changed
