"""GPU gaps between a cuBLAS GEMM and a compiled (Triton) kernel, run eagerly and as a CUDA graph.

    python benchmarks/graph_gaps.py            # needs CUDA

A control for the MoE profile's repeating 35-83 us gaps inside the layer graphs
(docs/benchmarks.md): the same kind of neighbours in a four-kernel graph, without the layer.
Prints the median gap between each pair of consecutive kernels over 20 runs.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


@torch.compile
def _rope_like(t: torch.Tensor) -> torch.Tensor:
    return (t.float() * torch.cos(t.float()) + torch.sin(t.float())).to(t.dtype)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(8192, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1536, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        y = F.linear(x, w, b)  # a QKV-like GEMM with bias
        z = _rope_like(y[:, :1536].view(8192, 12, 128))
        return torch.mm(z.view(8192, 1536), w.t())

    side = torch.cuda.Stream()  # warm-up (compilation) off the capturing stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    for label, run in (("eager", step), ("graph", graph.replay)):
        print(label)
        for (before, after), gap in median_gaps(run).items():
            print(f"  {gap:7.1f} us  {before} -> {after}")


def median_gaps(run) -> dict[tuple[str, str], float]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            run()
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name[:60])
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name
    )
    pairs: dict[tuple[str, str], list[float]] = {}
    for (_, end, before), (start, _, after) in itertools.pairwise(kernels):
        pairs.setdefault((before, after), []).append(start - end)
    return {pair: sorted(gaps)[len(gaps) // 2] for pair, gaps in pairs.items()}


if __name__ == "__main__":
    main()
