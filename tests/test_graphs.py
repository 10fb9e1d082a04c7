"""The CPU-checkable parts of the CUDA-graph layers (the graphs themselves are in test_gpu.py)."""

from __future__ import annotations

import torch

from lightning_megatron import GPTConfig, GPTModule
from lightning_megatron.models.graphs import _stand_in_parameters, release_layer_graphs
from tests.test_training import CONFIG, loader, trainer


def test_stand_in_parameters_share_storage_and_attributes_and_are_restored():
    """Capture records through stand-ins: new leaves on the same storage, with the real
    parameters' attributes (main_grad), in parameters() order; frozen ones stay real."""
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    layer[0].bias.requires_grad_(False)
    for param in layer.parameters():
        param.main_grad = torch.zeros_like(param, dtype=torch.float32)
    real = [p for p in layer.parameters() if p.requires_grad]
    with _stand_in_parameters([layer]) as (stand_ins,):
        assert len(stand_ins) == len(real) == 3
        for alias, param in zip(stand_ins, real, strict=True):
            assert alias is not param and alias.data_ptr() == param.data_ptr()
            assert alias.main_grad is param.main_grad
        assert list(layer.parameters())[0] is stand_ins[0]
        assert layer[0].bias is not None and not layer[0].bias.requires_grad  # untouched
        layer(torch.ones(1, 4)).sum().backward()
        assert stand_ins[0].grad is not None and real[0].grad is None  # autograd saw the stand-ins
    assert [p for p in layer.parameters() if p.requires_grad] == real


def test_no_graphs_on_cpu_and_release_is_a_no_op():
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=1e-3)
    trainer(max_steps=1).fit(model, loader())
    layers = [m for m in model.modules() if hasattr(m, "cuda_graphs")]
    assert layers == []  # the strategy installs graphs only where they apply (CUDA)
    assert release_layer_graphs(model.chunks) == 0
