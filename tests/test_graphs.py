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


class _Layer(torch.nn.Module):
    """Stands in for a TransformerLayer: keyword call, returns (hidden_states, context)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, hidden_states=None, rotary_pos_emb=None, **kwargs):
        return self.linear(hidden_states), None


def test_graphed_layers_run_their_own_forward_off_cuda_and_survive_a_deep_copy():
    """Off CUDA (or in eval, or without grad) a graphed layer runs its own forward; a deep copy of
    the model gets graphs of its own, bound to the copied layers and their weights."""
    from copy import deepcopy

    from lightning_megatron.models.graphs import _BlockGraphs

    model = torch.nn.Sequential(_Layer(), _Layer())
    x = torch.randn(3, 4)
    expected = [layer.linear(x) for layer in model]
    _BlockGraphs(list(model), grads_into_main_grad=True)
    assert all(torch.equal(layer(hidden_states=x)[0], e) for layer, e in zip(model, expected, strict=True))

    copy = deepcopy(model)
    with torch.no_grad():
        copy[0].linear.weight.zero_()
    assert copy[0].cuda_graphs is not model[0].cuda_graphs
    assert copy[0].cuda_graphs.layers == list(copy) and copy[1].cuda_graphs is copy[0].cuda_graphs
    assert torch.equal(copy[0](hidden_states=x)[0], copy[0].linear.bias.expand(3, 4))  # the copy's weights
    assert torch.equal(model[0](hidden_states=x)[0], expected[0])  # the original's are untouched
