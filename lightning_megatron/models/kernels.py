"""The fast path without Transformer Engine or apex: fused kernels from ``torch.compile`` and cuBLAS.

Measured on one H100 (docs/benchmarks.md), the local layer spec spends most of its non-GEMM time
in a handful of memory-bound places. Each has a Megatron-Core switch whose fused kernel normally
comes from TE or apex; here they come from torch itself:

- cross entropy: :func:`vocab_parallel_cross_entropy` reads the bf16 logits twice (once forward,
  in a Triton kernel, once backward) and writes their gradient once (Megatron's versions make fp32
  copies of the 151k-wide logits and keep one);
- RoPE (``apply_rope_fusion``): :func:`rotary` is one compiled kernel per tensor and direction;
- SwiGLU (``bias_activation_fusion``): Megatron's own compiled kernel, which keeps only its input;
- weight gradients (``gradient_accumulation_fusion``): :func:`wgrad_gemm_accum_fp32` accumulates
  the bf16 GEMM straight into the fp32 ``main_grad`` (no bf16 gradient, no separate add).

``torch.compile`` is used on CUDA tensors only; on CPU the same functions run eagerly.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton comes with CUDA builds of torch only (expert_kernels imports it from here)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds
    triton = tl = None


def kernel_config_kwargs(
    device: torch.device, params_dtype: torch.dtype, fused: bool = True, expert_parallel: int = 1
) -> dict[str, Any]:
    """``TransformerConfig`` fields of the fast path (CUDA only; ``fused=False``: none).

    Besides the fused kernels: without expert parallelism, MoE tokens go through Megatron's
    all-gather dispatcher (the same result as all-to-all, with fewer kernels and host syncs:
    +12% tokens/s on the benchmark's MoE shape). Where TP x EP is 1, the sorted dispatcher of
    :mod:`lightning_megatron.models.moe` replaces either.
    """
    if not fused or device.type != "cuda":
        return {}
    values: dict[str, Any] = {"bias_activation_fusion": True, "apply_rope_fusion": _rope_slot_filled()}
    if expert_parallel == 1:
        values["moe_token_dispatcher_type"] = "allgather"
    if params_dtype != torch.float32:
        # main_grad is fp32 whenever params are 16-bit (grads reduced in fp32, or bf16 for
        # bf16-true, which the accumulation below also handles).
        values["gradient_accumulation_fusion"] = _wgrad_slot_filled()
    return values


def compiled_on_cuda(fn: Callable) -> Callable:
    """``fn`` through ``torch.compile`` when its first tensor argument is on CUDA, else eager."""
    compiled = torch.compile(fn, dynamic=None)

    @functools.wraps(fn)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs) if args[0].is_cuda else fn(*args, **kwargs)

    return dispatch


# ----------------------------------------------------------------------------- cross entropy
# The single-pass Triton kernel for the rows' max and sum of exponentials (CUDA); False: the
# compiled torch formulation (two passes over the logits). A switch for benchmarks/train_throughput.py.
TRITON_ROW_STATS = True


def row_max_sum_exp(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``logits [rows, vocab]``: its max ``m`` and ``sum(exp(logits - m))``, in fp32.

    ``m + log(sum)`` is the row's logsumexp; under TP each rank's pair is combined with the
    others' (see :class:`_VocabParallelCrossEntropy`). On CUDA one Triton kernel reads each row
    once (online max); torch's compiled logsumexp reads it twice, which at the benchmark's
    151,936-wide vocabulary is 2.5 GB per microbatch and pass (docs/benchmarks.md).
    """
    if triton is not None and logits.is_cuda and TRITON_ROW_STATS:
        return _row_max_sum_exp_triton(logits)
    return _row_max_sum_exp_compiled(logits)


def _row_max_sum_exp_torch(logits: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.float()  # one fp32 copy (eager, on CPU), not one per use
    row_max = logits.amax(dim=-1)
    # A row of -inf only (no finite logit) sums to 0 rather than exp(nan).
    finite_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    return row_max, torch.exp(logits - finite_max.unsqueeze(-1)).sum(dim=-1)


_row_max_sum_exp_compiled = compiled_on_cuda(_row_max_sum_exp_torch)


if triton is not None:

    @triton.jit
    def _row_max_sum_exp_kernel(x_ptr, max_ptr, sum_ptr, stride, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        row_max = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        for start in tl.range(0, vocab, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0, keep_dims=True))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: keep 0
            total = total * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift), axis=0, keep_dims=True)
            row_max = new_max
        first = tl.arange(0, 1)
        tl.store(max_ptr + row + first, row_max)
        tl.store(sum_ptr + row + first, total)


def _row_max_sum_exp_triton(logits: Tensor, block: int = 4096, warps: int = 8) -> tuple[Tensor, Tensor]:
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    row_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    total = torch.empty_like(row_max)
    if rows:
        _row_max_sum_exp_kernel[(rows,)](
            logits, row_max, total, logits.stride(0), vocab, BLOCK=min(block, triton.next_power_of_2(vocab)),
            num_warps=warps,
        )  # fmt: skip
    return row_max, total


@compiled_on_cuda
def _softmax_minus_onehot(logits: Tensor, lse: Tensor, target: Tensor, grad: Tensor) -> Tensor:
    # d loss / d logits = (softmax - onehot(target)) * grad, in one pass over the logits.
    columns = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (columns == target.unsqueeze(-1)).float()
    return ((torch.exp(logits.float() - lse.unsqueeze(-1)) - onehot) * grad.unsqueeze(-1)).to(logits.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group) -> Tensor:
        shape = target.shape
        vocab = logits.shape[-1]
        logits = logits.reshape(-1, vocab)
        target = target.reshape(-1)
        tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        start = 0 if tp_size == 1 else torch.distributed.get_rank(tp_group) * vocab
        # Ids outside this rank's slice of the vocabulary point at column -1 (out of reach).
        local = target - start
        mine = (local >= 0) & (local < vocab)
        local = torch.where(mine, local, -1)
        predicted = logits.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1).float() * mine
        row_max, sum_exp = row_max_sum_exp(logits)
        if tp_size > 1:
            # Each rank's sum is relative to its own max: rescale to the global max, then add.
            local_max = row_max.clone()
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            sum_exp = sum_exp * torch.exp(local_max - row_max)
            torch.distributed.all_reduce(sum_exp, group=tp_group)
            torch.distributed.all_reduce(predicted, group=tp_group)
        lse = row_max + torch.log(sum_exp)
        ctx.save_for_backward(logits, lse, local)
        ctx.shape = shape
        return (lse - predicted).view(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, local = ctx.saved_tensors
        grad_logits = _softmax_minus_onehot(logits, lse, local, grad.reshape(-1).float())
        return grad_logits.view(*ctx.shape, -1), None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp_group=None) -> Tensor:
    """Per-token cross entropy of vocab-parallel logits ``[..., vocab/tp]`` against ``target [...]``.

    Same result as Megatron-Core's ``vocab_parallel_cross_entropy`` (fp32 math), but the logits
    stay in their own dtype: the forward keeps them (no fp32 copy, no saved softmax) and the
    backward recomputes the softmax in the same pass that writes the gradient.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)


# ---------------------------------------------------------------------------------------- RoPE
def rope_half(t: Tensor, freqs: Tensor) -> Tensor:
    """Megatron's non-interleaved RoPE (``_apply_rotary_pos_emb_bshd``) as plain torch ops."""
    rot_dim = freqs.shape[-1]
    x, rest = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x * torch.cos(freqs).to(t.dtype) + rotated * torch.sin(freqs).to(t.dtype)
    return torch.cat((out, rest), dim=-1)


_rotary_half = compiled_on_cuda(rope_half)


def rotary(t: Tensor, freqs: Tensor, interleaved: bool = False) -> Tensor:
    """Megatron's ``fused_apply_rotary_pos_emb`` contract: RoPE on ``t [s, b, heads, d]``.

    The same arithmetic as Megatron's unfused ``_apply_rotary_pos_emb_bshd`` in one compiled
    kernel (Megatron's eager version launches about eight per call).
    """
    if interleaved:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    return _rotary_half(t, freqs)


# -------------------------------------------------------------------------------- weight grads
def wgrad_gemm_accum_fp32(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` with fp32 accumulation, in one GEMM on CUDA
    (cuBLAS reads and writes the fp32 ``main_grad`` as its C matrix, beta=1)."""
    if main_grad.is_cuda and total_input.dtype != torch.float32 and HAS_FP32_OUT_GEMM:
        torch.ops.aten.addmm.dtype_out(main_grad, grad_output.t(), total_input, torch.float32, out=main_grad)
        return
    main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))


# 16-bit inputs, fp32 output (torch >= 2.8). Called through torch.ops: torch 2.11's Python
# signatures of mm/addmm do not take its out_dtype argument.
HAS_FP32_OUT_GEMM = hasattr(torch.ops.aten.addmm, "dtype_out") and hasattr(torch.ops.aten.mm, "dtype")


def wgrad_gemm_accum_fp16(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` for 16-bit ``main_grad`` (bf16-true)."""
    main_grad.addmm_(grad_output.t(), total_input)


class _WgradAccumulation:
    """Stands in for apex's ``fused_weight_gradient_mlp_cuda`` module (same two functions)."""

    wgrad_gemm_accum_fp32 = staticmethod(wgrad_gemm_accum_fp32)
    wgrad_gemm_accum_fp16 = staticmethod(wgrad_gemm_accum_fp16)


def use_embedding_grads_into_main_grad(model: torch.nn.Module) -> bool:
    """Make ``model``'s word embedding add its weight gradient row by row into the fp32 ``main_grad``
    that Megatron DDP keeps (as ``gradient_accumulation_fusion`` does for linears); returns
    whether it did.

    F.embedding's backward builds a dense ``[vocab, hidden]`` gradient for a few thousand looked-up
    rows, and DDP's hook then adds all of it into ``main_grad``: for a 151,936-word vocabulary about
    1 ms per microbatch on an H100, against tens of microseconds for the rows alone. Left as it was
    under tensor parallelism (the vocabulary is split) and for embeddings tied to the output
    layer (whose gradient also reaches the weight, and DDP's hook would skip it).
    """
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if embedding is None or getattr(model, "share_embeddings_and_output_weights", False):
        return False
    if embedding.tp_group.size() > 1:
        return False
    embedding.forward = types.MethodType(_embedding_forward, embedding)
    return True


def _embedding_forward(embedding: torch.nn.Module, ids: Tensor) -> Tensor:
    return _EmbeddingIntoMainGrad.apply(ids, embedding.weight)


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    """``weight[ids]``; the backward accumulates the rows' gradients into ``weight.main_grad`` and,
    like Megatron's fused linears, marks the weight so DDP's hook does not add them again."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None
        (ids,) = ctx.saved_tensors
        weight, index = ctx.weight, (ids.reshape(-1),)
        rows = grad.reshape(-1, grad.shape[-1])
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None or not hasattr(weight, "grad_added_to_main_grad"):  # no Megatron DDP
            return None, torch.zeros_like(weight).index_put_(index, rows.to(weight.dtype), accumulate=True)
        # index_put_ with accumulate sums repeated ids in a fixed order (no atomics): deterministic.
        main_grad.index_put_(index, rows.to(main_grad.dtype), accumulate=True)
        weight.grad_added_to_main_grad = True
        # DDP's hook still has to run (it marks the bucket ready under overlap_grad_reduce): hand
        # autograd a gradient it will never read, as Megatron's fused linears do.
        return None, torch.empty_like(weight)


# ---------------------------------------------------------------------------------- grad norm
def multi_tensor_l2norm(chunk_size: int, noop_flag: Tensor, tensor_lists: list, per_tensor: bool, *args: Any):
    """apex's ``amp_C.multi_tensor_l2norm`` contract in torch ops: the L2 norm of all tensors of
    ``tensor_lists[0]`` as a 1-element tensor on their device (and the per-tensor norms).

    Megatron's own fallback reads every per-tensor norm to the host (``torch.tensor`` of a list
    of CUDA scalars): one host sync per gradient tensor, about 180 per step on the MoE benchmark,
    each draining the GPU's queue. Here one foreach kernel computes them all.
    """
    norms = torch.stack(torch._foreach_norm(tensor_lists[0])).float()
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


# ------------------------------------------------------------------------ Megatron's slots
def install() -> None:
    """Fill Megatron-Core's fused-kernel slots that TE / apex would fill, where they are empty.

    Only the slots change; Megatron uses them when a config turns the matching flag on
    (:func:`kernel_config_kwargs` does on CUDA), and TE's or apex's own kernels win when present.
    """
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2norm
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = rotary
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _WgradAccumulation
        layers._grad_accum_fusion_available = True


def limit_wgrad_fusion(chunks) -> None:
    """Turn weight-gradient fusion off in the linear layers where Megatron cannot use it.

    Frozen weights have no ``main_grad`` to accumulate into, and an output layer whose weight is
    the (tied) embedding's gets it passed in at call time (``weight is None`` here): its fused
    path would mark the shared weight's gradient as already added and drop the embedding's part.
    """
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "gradient_accumulation_fusion", False):
                weight = getattr(module, "weight", None)
                if weight is None or not weight.requires_grad:
                    module.gradient_accumulation_fusion = False


def _rope_slot_filled() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def _wgrad_slot_filled() -> bool:
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)
