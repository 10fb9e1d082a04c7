"""Triton kernels for the routed experts: what torch has no kernel for.

- :class:`ExpertGemm`: the expert GEMMs with their weight gradient accumulated into the fp32
  ``main_grad`` by the GEMM itself. ``torch._grouped_mm`` writes its result in bf16 only, so its
  autograd hands back a bf16 weight gradient per microbatch, which a separate kernel then adds
  into Megatron's fp32 ``main_grad``: on the Qwen2-MoE benchmark shape that add reads and writes
  12 bytes per expert weight per microbatch, 40 ms of an 800 ms H100 step (docs/benchmarks.md).
  Here each output tile of ``main_grad`` is loaded, its fp32 accumulator added and stored back.
- :func:`weighted_swiglu`: the experts' SwiGLU weighted by the routing probabilities, whose
  backward computes the input's and the probabilities' gradients in one pass over the rows
  (Megatron's compiled version reads them twice: a pointwise kernel, then a reduction).

Triton ships with CUDA builds of torch; everywhere else the torch formulation runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_megatron.models.kernels import tl, triton


def fused_wgrad_supported(weight: Tensor) -> bool:
    """Whether the Triton kernel can accumulate ``weight``'s gradient into its ``main_grad``: a
    16-bit CUDA weight whose fp32 ``main_grad`` comes from Megatron DDP (which reads
    ``grad_added_to_main_grad``, its protocol for gradients added in the GEMM)."""
    main_grad = getattr(weight, "main_grad", None)
    return (
        triton is not None
        and weight.is_cuda
        and weight.requires_grad
        and weight.dtype in (torch.bfloat16, torch.float16)
        and main_grad is not None
        and main_grad.dtype == torch.float32
        and main_grad.is_contiguous()
        and hasattr(weight, "grad_added_to_main_grad")
    )


def expert_gemm(x: Tensor, weight: Tensor, ends: Tensor, fuse_wgrad: bool) -> Tensor:
    """``x[rows_e] @ weight[e].T`` for every expert ``e`` (rows ``ends[e-1]:ends[e]``), with the
    weight gradient accumulated in the GEMM (:class:`ExpertGemm`) where ``fuse_wgrad`` and
    :func:`fused_wgrad_supported` allow it."""
    if fuse_wgrad and fused_wgrad_supported(weight):
        return ExpertGemm.apply(x, weight, ends)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)


if triton is not None:

    @triton.jit
    def _grouped_wgrad_kernel(
        dy_ptr, x_ptr, out_ptr, ends_ptr, M, N,
        stride_dy, stride_x, stride_out_e, stride_out_m,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        # out[e] += dy[rows of e]^T @ x[rows of e]; rows of expert e are ends[e-1]:ends[e].
        tile, expert = tl.program_id(0), tl.program_id(1)
        tiles_n = tl.cdiv(N, BLOCK_N)
        rm = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
        end = tl.load(ends_ptr + expert).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(start, end, BLOCK_K, num_stages=STAGES):
            rows = k + rk
            inside = rows < end
            a = tl.load(dy_ptr + rows[None, :] * stride_dy + rm[:, None], mask=inside[None, :] & (rm[:, None] < M))
            b = tl.load(x_ptr + rows[:, None] * stride_x + rn[None, :], mask=inside[:, None] & (rn[None, :] < N))
            acc = tl.dot(a, b, acc)
        out = out_ptr + expert * stride_out_e + rm[:, None] * stride_out_m + rn[None, :]
        keep = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out, tl.load(out, mask=keep) + acc, mask=keep)


def grouped_wgrad_accumulate(
    grad: Tensor, x: Tensor, ends: Tensor, main_grad: Tensor, config: tuple[int, int, int, int, int] | None = None
) -> None:
    """``main_grad[e] += grad[rows_e]^T @ x[rows_e]`` for every expert ``e``, in fp32, where expert
    ``e``'s rows are ``ends[e-1]:ends[e]`` (``ends``: int32 cumulative row counts, on the device).

    ``grad`` is ``[rows, out]``, ``x`` is ``[rows, in]`` and ``main_grad`` is ``[experts, out, in]``.
    ``config`` is (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps).
    """
    experts, m, n = main_grad.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_m, block_n, block_k, stages, warps = config or _CONFIG
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), experts)
    _grouped_wgrad_kernel[grid](
        grad, x, main_grad, ends, m, n,
        grad.stride(0), x.stride(0), main_grad.stride(0), main_grad.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps,
    )  # fmt: skip


_CONFIG = (128, 128, 64, 3, 4)


class ExpertGemm(torch.autograd.Function):
    """``torch._grouped_mm`` forward; the backward adds the weight gradient straight into
    ``weight.main_grad`` (see :func:`fused_wgrad_supported`) and marks the weight as Megatron's
    fused linears do, so DDP's hook does not add it again."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, ends: Tensor) -> Tensor:
        ctx.save_for_backward(x, ends)
        ctx.weight = weight  # the parameter itself: main_grad is an attribute of it
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, ends = ctx.saved_tensors
        weight = ctx.weight
        grad_x = torch._grouped_mm(grad, weight, offs=ends) if ctx.needs_input_grad[0] else None
        grouped_wgrad_accumulate(grad, x, ends, weight.main_grad)
        weight.grad_added_to_main_grad = True
        # DDP's hook still runs (it marks the bucket ready under overlap_grad_reduce): hand
        # autograd a gradient it never reads, as Megatron's fused linears do.
        return grad_x, torch.empty_like(weight), None


# ----------------------------------------------------------------------------- weighted SwiGLU
def weighted_swiglu(x: Tensor, probs: Tensor) -> Tensor:
    """``silu(gate) * up * probs`` for ``x = [gate | up]`` of ``[rows, 2f]`` and ``probs`` of
    ``[rows, 1]``, in the dtype of ``x`` (Megatron's ``weighted_bias_swiglu_impl`` without bias)."""
    return _WeightedSwiGLU.apply(x, probs)


def _swiglu_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = torch.chunk(x.float(), 2, dim=-1)
    return gate, up


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor) -> Tensor:
        ctx.save_for_backward(x, probs)
        return _weighted_swiglu_forward(x, probs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, probs = ctx.saved_tensors
        if triton is not None and grad.is_cuda and x.is_contiguous():
            return _weighted_swiglu_backward_triton(grad, x, probs)
        gate, up = _swiglu_parts(x)
        g, p = grad.float(), probs.float()
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = g * p * sig * (1 + gate * (1 - sig)) * up
        grad_up = g * p * silu
        grad_probs = (silu * up * g).sum(-1, keepdim=True)
        return torch.cat([grad_gate, grad_up], -1).to(x.dtype), grad_probs.to(probs.dtype)


def _weighted_swiglu_forward_eager(x: Tensor, probs: Tensor) -> Tensor:
    gate, up = _swiglu_parts(x)
    return (torch.nn.functional.silu(gate) * up * probs.float()).to(x.dtype)


def _weighted_swiglu_forward(x: Tensor, probs: Tensor) -> Tensor:
    if x.is_cuda:
        return _weighted_swiglu_forward_compiled(x, probs)
    return _weighted_swiglu_forward_eager(x, probs)


_weighted_swiglu_forward_compiled = torch.compile(_weighted_swiglu_forward_eager, dynamic=None)


if triton is not None:

    @triton.jit
    def _weighted_swiglu_backward_kernel(
        grad_ptr, x_ptr, probs_ptr, grad_x_ptr, grad_probs_ptr, rows, F: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        c = tl.arange(0, BLOCK_F)[None, :]
        keep = (r < rows) & (c < F)
        gate = tl.load(x_ptr + r * (2 * F) + c, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + r * (2 * F) + F + c, mask=keep, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + r * F + c, mask=keep, other=0.0).to(tl.float32)
        p = tl.load(probs_ptr + r, mask=r < rows, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        gp = g * p
        grad_gate = gp * sig * (1 + gate * (1 - sig)) * up
        grad_up = gp * silu
        out = grad_x_ptr + r * (2 * F) + c
        tl.store(out, grad_gate.to(grad_x_ptr.dtype.element_ty), mask=keep)
        tl.store(out + F, grad_up.to(grad_x_ptr.dtype.element_ty), mask=keep)
        grad_probs = tl.sum(silu * up * g, axis=1)[:, None]
        tl.store(grad_probs_ptr + r, grad_probs.to(grad_probs_ptr.dtype.element_ty), mask=r < rows)


def _weighted_swiglu_backward_triton(grad: Tensor, x: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    rows, f = grad.shape
    grad = grad.contiguous()
    grad_x = torch.empty_like(x)
    grad_probs = torch.empty(rows, 1, dtype=probs.dtype, device=probs.device)
    block_f = triton.next_power_of_2(f)
    block_rows = max(1, 4096 // block_f)
    _weighted_swiglu_backward_kernel[(triton.cdiv(rows, block_rows),)](
        grad, x, probs.contiguous(), grad_x, grad_probs, rows, f, BLOCK_ROWS=block_rows, BLOCK_F=block_f, num_warps=4
    )
    return grad_x, grad_probs
