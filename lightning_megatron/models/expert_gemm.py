"""Expert GEMMs whose weight gradient is accumulated into the fp32 ``main_grad`` by the GEMM itself.

``torch._grouped_mm`` writes its result in bf16 only. Its autograd therefore hands back a bf16
weight gradient per microbatch, which is then added into Megatron's fp32 ``main_grad`` by a
separate kernel: on the Qwen2-MoE benchmark shape that add reads and writes 12 bytes per expert
weight per microbatch, 40 ms of an 800 ms H100 step (docs/benchmarks.md). A grouped GEMM that
loads each output tile of ``main_grad``, adds its fp32 accumulator and stores it back does the
same work in the GEMM's epilogue: no bf16 gradient, no second pass. torch has no such kernel, so
this module has one, in Triton (it ships with torch on CUDA); everywhere else the weight gradient
comes from ``torch._grouped_mm`` as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton comes with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds
    triton = None


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
