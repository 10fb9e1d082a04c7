"""The expert weight gradient of one MoE layer call: Triton's grouped GEMM accumulating into the fp32
``main_grad`` (``lightning_megatron.models.expert_kernels``) against ``torch._grouped_mm`` plus the
separate fp32 add it needs (what autograd and the graphs did before), on one CUDA GPU.

    python benchmarks/expert_wgrad.py                # the Qwen2-MoE benchmark shape, 2 x 4096 tokens, top-4
    python benchmarks/expert_wgrad.py --rows 65536   # micro batch 4

Prints, for fc1 and fc2: time per call, TFLOP/s, and the error against an fp32 reference.
"""

from __future__ import annotations

import argparse

import torch

from lightning_megatron.models.expert_kernels import grouped_wgrad_accumulate


def time_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--rows", type=int, default=32768, help="expert rows: tokens x top-k")
    args = parser.parse_args()
    torch.manual_seed(0)
    experts, rows = args.experts, args.rows
    counts = torch.bincount(torch.randint(0, experts, (rows,), device="cuda"), minlength=experts)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    for name, out, inp in (("fc1", 2 * args.ffn, args.hidden), ("fc2", args.hidden, args.ffn)):
        grad = torch.randn(rows, out, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
        print(f"{name} [{experts} x {out} x {inp}], {rows} rows: {measure(grad, x, counts, ends)}")


def measure(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor) -> str:
    experts, out, inp = len(counts), grad.shape[1], x.shape[1]
    main_grad = torch.zeros(experts, out, inp, device="cuda")
    exact = torch.zeros_like(main_grad)
    start = 0
    for e, count in enumerate(counts.tolist()):
        exact[e] = grad[start : start + count].float().t() @ x[start : start + count].float()
        start += count
    grouped_wgrad_accumulate(grad, x, ends, main_grad)
    error = ((main_grad - exact).abs().max() / exact.abs().max()).item()

    def torch_path() -> None:
        # What autograd of _grouped_mm(x, w.transpose(1, 2)) hands back (the transposed [E, in, out]
        # gradient, in bf16), then the fp32 add into main_grad.
        main_grad.add_(torch._grouped_mm(x.t(), grad, offs=ends).transpose(1, 2))

    flops = 2 * grad.shape[0] * out * inp
    ours = time_us(lambda: grouped_wgrad_accumulate(grad, x, ends, main_grad))
    gemm_only, theirs = time_us(lambda: torch._grouped_mm(x.t(), grad, offs=ends)), time_us(torch_path)
    return (
        f"Triton into fp32 main_grad {ours:.0f} us ({flops / ours / 1e6:.0f} TFLOP/s, relative error "
        f"{error:.1e}); torch grouped GEMM {gemm_only:.0f} us + fp32 add = {theirs:.0f} us"
    )


if __name__ == "__main__":
    main()
