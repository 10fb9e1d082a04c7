"""CPU mode is scoped: CUDA spellings land on the CPU inside, and everything is restored after."""

from __future__ import annotations

import torch

from lightning_megatron.cpu import cpu_mode


def test_cuda_devices_land_on_cpu_inside_and_are_restored_after():
    before = torch.cuda.current_device, torch.cuda.synchronize
    with cpu_mode():
        assert torch.empty(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            pass
    assert (torch.cuda.current_device, torch.cuda.synchronize) == before
    assert torch.ones(2).type() == "torch.FloatTensor"


def test_model_parallel_rng_fork_uses_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mcore_random

    with cpu_mode():
        tracker = mcore_random.CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 123)
        outside = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), outside)
        torch.manual_seed(123)
        assert torch.equal(first, torch.rand(3))
