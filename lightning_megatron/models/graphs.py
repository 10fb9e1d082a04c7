"""CUDA graphs of whole transformer layers (forward and backward), without Transformer Engine.

A transformer layer launches hundreds of small kernels per microbatch, each through Python
(Megatron's modules, autograd functions, compiled-kernel wrappers). On the MoE benchmark shape the
host needed more time to launch a step than the GPU needed to run it, so the GPU idled. A CUDA
graph replays a layer's recorded kernels with one launch; the Python runs once, at capture.

:func:`use_layer_graphs` gives every ``TransformerLayer`` of a model a forward that, on its first
training call, captures all layers of its block (the forward graphs in layer order and the
backward graphs in reverse, sharing one memory pool, as ``torch.cuda.make_graphed_callables``
does), then replays them on every call with the same input shape. Everything else runs the layer
eagerly: evaluation, no-grad calls, other shapes, masks or packed sequences.

``make_graphed_callables`` itself cannot be used: recording a backward through the real
parameters runs their gradient accumulators, which Megatron DDP created (and holds) on the
default stream, and a capture may not touch the default stream. The graphs are recorded through
stand-in parameters that share the real ones' storage instead.

What a replay cannot do is run Python, and three things in a layer rely on it; each is handled:

- Gradients: by default the backward graph adds each weight gradient into Megatron DDP's fp32
  ``main_grad`` itself (all that DDP's per-parameter hook does unless gradient reduction
  overlaps the backward). With ``overlap_grad_reduce`` the gradients are returned to the real
  parameters instead, so DDP's hooks run; Megatron's fused linear layers have then added theirs
  already and mark it with ``grad_added_to_main_grad``, which the graphed forward re-sets (it is
  Python) on every call.
- The capture's warm-up iterations run real backward passes, whose fused weight gradients land in
  ``main_grad``: those buffers are zeroed after the capture (it happens in the step's first
  forward, before any backward has written a gradient this step).
- The graphs hold the addresses of the parameters and of their ``main_grad`` buffers. A new fit
  with the same module (a new DDP wrapper, so new buffers), adapters or frozen weights is seen at
  the first layer's next call, the step's first forward, and the block is captured again.

Requirements (checked by :func:`layer_graphs_supported`): CUDA, no pipeline or context parallelism
(they keep several microbatches' activations alive, and a graph's buffers hold one), tensor and
expert parallel size 1 (no collectives inside a layer), no recompute, no dropout, no TE layers.
Memory: the graphs' pool holds one microbatch's activations and gradients for good, so
``torch.cuda.max_memory_allocated`` undercounts; compare ``max_memory_reserved``.
"""

from __future__ import annotations

import contextlib
import types
from copy import deepcopy
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

# Layer i's graph reads layer i-1's output buffer in place (backward: layer i-1 reads layer i's
# input-gradient buffer), so a replay copies neither; False: each graph has its own buffers, and
# every call copies into them. A switch for benchmarks/train_throughput.py.
CHAIN_BUFFERS = True

# Keyword arguments a graphed call must leave at None: they change what the layer computes.
_UNGRAPHED_KWARGS = (
    "attention_mask",
    "context",
    "context_mask",
    "rotary_pos_cos",
    "rotary_pos_sin",
    "rotary_pos_cos_sin",
    "attention_bias",
    "inference_context",
    "packed_seq_params",
    "sequence_len_offset",
    "padding_mask",
    "inference_params",
)


def layer_graphs_supported(config: Any, device: torch.device, use_te: bool) -> bool:
    """Whether :func:`use_layer_graphs` can apply to a model built with ``config`` on ``device``."""
    sizes = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    )
    return (
        device.type == "cuda"
        and not use_te
        and sizes == (1, 1, 1, 1)
        and config.recompute_granularity is None
        and not config.hidden_dropout
        and not config.attention_dropout
        and not config.fp8
    )


def use_layer_graphs(model: torch.nn.Module, grads_into_main_grad: bool = True) -> int:
    """Graph the transformer layers of every block in ``model`` on first use; returns how many.

    With ``grads_into_main_grad`` the backward graphs add the weight gradients into Megatron DDP's
    fp32 ``main_grad`` themselves, which is all DDP's per-parameter hooks do unless gradient
    reduction overlaps the backward (``overlap_grad_reduce``, which needs the hooks: pass False).
    """
    count = 0
    for block in model.modules():
        if isinstance(block, TransformerBlock) and len(block.layers):
            _BlockGraphs(list(block.layers), grads_into_main_grad)
            count += len(block.layers)
    return count


def release_layer_graphs(model: torch.nn.Module) -> int:
    """Free the captured graphs of ``model`` (their memory pool included); the layers capture
    again on their next training call. The graphs belong to one fit: they add into that fit's
    gradient buffers. Returns how many blocks had graphs."""
    released = 0
    for block in model.modules():
        if not isinstance(block, TransformerBlock) or not len(block.layers):
            continue
        graphs = getattr(block.layers[0], "cuda_graphs", None)
        if graphs is not None and graphs.key is not None:
            graphs.release()
            released += 1
    return released


def _graphed_forward(layer: TransformerLayer, *args: Any, **kwargs: Any):
    """A graphed layer's ``forward``: its block's graphs decide between replay and eager."""
    return layer.cuda_graphs.forward(layer, *args, **kwargs)


class _LayerGraph:
    """One layer's forward and backward graphs with their static input, output and gradient buffers."""

    def __init__(self, layer: TransformerLayer) -> None:
        self.layer = layer
        self.params: list[torch.nn.Parameter] = []  # the trainable parameters at capture
        self.grad_ptrs: list[int] = []  # and the addresses of their main_grad buffers
        self.fused_weights: list[torch.nn.Parameter] = []  # see _fused_wgrad_weights

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """The layer's own (class) forward."""
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def run_eager(self, hidden_states: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self.eager(hidden_states=hidden_states, rotary_pos_emb=rope)[0]

    def stale(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether ``params`` (the layer's trainable parameters now) or their ``main_grad`` buffers
        differ from the ones the graphs were captured with."""
        if len(params) != len(self.params):
            return True
        captured = zip(params, self.params, self.grad_ptrs, strict=True)
        return any(now is not then or _main_grad_ptr(now) != ptr for now, then, ptr in captured)

    def gradients(self, output: torch.Tensor, grad_output: torch.Tensor, params: list) -> tuple:
        return torch.autograd.grad(output, [self.hidden, *params], grad_output, allow_unused=True)


class _Replay(torch.autograd.Function):
    """Replays a captured layer: forward graph in ``forward``, backward graph in ``backward``.
    Unless the graphs add the gradients into ``main_grad`` themselves, the layer's trainable
    parameters are inputs, so that their gradients reach Megatron DDP's hooks."""

    @staticmethod
    def forward(ctx, graph: _LayerGraph, hidden_states: torch.Tensor, rope: torch.Tensor, *params: torch.Tensor):
        _into_static(graph.hidden, hidden_states)
        if rope is not graph.rope_source[0]:  # all layers of a block share one rope buffer
            graph.rope.copy_(rope)
            graph.rope_source[0] = rope
        graph.forward_graph.replay()
        ctx.graph = graph
        return graph.output.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        graph = ctx.graph
        _into_static(graph.grad_output, grad_output)
        graph.backward_graph.replay()
        grad_hidden, *grad_params = graph.grads
        return (None, grad_hidden, None, *grad_params)


class _BlockGraphs:
    """The graphs of one block's layers, captured together on the first graphable call."""

    def __init__(self, layers: list[TransformerLayer], grads_into_main_grad: bool) -> None:
        self.grads_into_main_grad = grads_into_main_grad
        self.layers = layers
        self.graphs = [_LayerGraph(layer) for layer in layers]
        self.key: tuple | None = None  # (shape, dtype, rope shape, rope dtype) captured for
        self.entry = 0  # index of the layer whose call captured the block
        for layer in layers:
            # A bound method, so that a deep copy of the model rebinds it to the copied layer.
            layer.forward = types.MethodType(_graphed_forward, layer)
            layer.cuda_graphs = self  # for inspection: cuda_graphs.key is set once captured

    def __deepcopy__(self, memo: dict) -> _BlockGraphs:
        # CUDA graphs cannot be copied: a copy of the model gets graphs of its own, captured on
        # its first training call.
        copy = _BlockGraphs.__new__(_BlockGraphs)
        memo[id(self)] = copy
        copy.__init__([deepcopy(layer, memo) for layer in self.layers], self.grads_into_main_grad)
        return copy

    def forward(self, layer: TransformerLayer, *args: Any, **kwargs: Any):
        index = self.layers.index(layer)
        graph = self.graphs[index]
        if args or not self._graphable(layer, kwargs):
            return graph.eager(*args, **kwargs)
        hidden_states, rope = kwargs["hidden_states"], kwargs["rotary_pos_emb"]
        key = (tuple(hidden_states.shape), hidden_states.dtype, tuple(rope.shape), rope.dtype)
        if self.key is not None and key != self.key:  # another shape (a shorter last batch)
            return graph.eager(*args, **kwargs)
        params = [p for p in layer.parameters() if p.requires_grad]
        if self.key is None or graph.stale(params):
            if self.key is not None and index != self.entry:
                raise RuntimeError(
                    f"transformer layer {index}'s trainable parameters or gradient buffers changed "
                    "in the middle of a forward pass, after its CUDA graph was captured; build the "
                    "strategy with MegatronStrategy(cuda_graphs=False)"
                )
            # First use, or a new fit (another DDP wrapper, adapters, frozen weights): the
            # step's first forward, before any backward wrote a gradient, so (re)capture.
            self._capture(hidden_states, rope, key)
            self.entry = index  # the first graphed layer of a forward (0 unless layer 0's input needs no grad)
        if graph.into_main_grad:
            return _Replay.apply(graph, hidden_states, rope), kwargs.get("context")
        for weight in graph.fused_weights:
            weight.grad_added_to_main_grad = True
        return _Replay.apply(graph, hidden_states, rope, *params), kwargs.get("context")

    @staticmethod
    def _graphable(layer: TransformerLayer, kwargs: dict[str, Any]) -> bool:
        hidden_states, rope = kwargs.get("hidden_states"), kwargs.get("rotary_pos_emb")
        return (
            layer.training
            and torch.is_grad_enabled()
            and isinstance(hidden_states, torch.Tensor)
            and hidden_states.is_cuda
            and hidden_states.requires_grad
            and isinstance(rope, torch.Tensor)
            and all(kwargs.get(name) is None for name in _UNGRAPHED_KWARGS)
            and not torch.cuda.is_current_stream_capturing()
        )

    def _capture(self, hidden_states: torch.Tensor, rope: torch.Tensor, key: tuple, warmup: int = 2) -> None:
        """Capture every layer's forward (in order) and backward (in reverse) into one memory pool,
        through stand-in parameters (see the module docstring)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if MoEAuxLossAutoScaler.main_loss_backward_scale is None:
            # The MoE auxiliary loss's gradient scale: Megatron's schedule copies into this tensor
            # after each forward, and the backward graphs must read the tensor it copies into
            # (left unset, the warm-up backward would create a 0-d one the copy cannot fill).
            MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1, device=hidden_states.device)
        self.release()  # a recapture frees the previous graphs' pool first
        shared_rope, rope_source = rope.detach().clone(), [rope]
        for graph in self.graphs:
            graph.hidden = torch.randn_like(hidden_states).requires_grad_(True)
            graph.rope, graph.rope_source = shared_rope, rope_source
        try:
            self._record(warmup)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(
                f"{error}\nThis happened while capturing the transformer layers as CUDA graphs, which keep "
                "one microbatch's activations and gradients in their own memory pool; set "
                "MegatronStrategy(cuda_graphs=False) to train eagerly"
            ) from error
        self.key = key
        for graph in self.graphs:
            graph.params = [p for p in graph.layer.parameters() if p.requires_grad]
            graph.grad_ptrs = [_main_grad_ptr(p) for p in graph.params]
            graph.fused_weights = _fused_wgrad_weights(graph.layer)
        # The warm-up backward passes accumulated fused weight gradients into main_grad.
        for layer in self.layers:
            for param in layer.parameters():
                if getattr(param, "main_grad", None) is not None:
                    param.main_grad.zero_()

    def release(self) -> None:
        """Drop the graphs and their buffers (the pool goes with the last of them)."""
        for graph in self.graphs:
            graph.forward_graph = graph.backward_graph = graph.output = graph.grads = None
            graph.hidden = graph.rope = graph.grad_output = graph.rope_source = None
            graph.params, graph.grad_ptrs, graph.fused_weights = [], [], []
        self.key = None

    def _record(self, warmup: int) -> None:
        with _stand_in_parameters(self.layers) as stand_ins:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiled kernels, cuBLAS/cuDNN plans, lazy state
                for graph, params in zip(self.graphs, stand_ins, strict=True):
                    for _ in range(warmup):
                        output = graph.run_eager(graph.hidden, graph.rope)
                        graph.gradients(output, torch.ones_like(output), params)
                    del output
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            previous = None
            for graph in self.graphs:
                if previous is not None and CHAIN_BUFFERS:  # see CHAIN_BUFFERS
                    graph.hidden = previous.output.detach().requires_grad_(True)
                graph.forward_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph.forward_graph, pool=pool):
                    graph.output = graph.run_eager(graph.hidden, graph.rope)
                previous = graph
            following = None
            for graph, params in zip(reversed(self.graphs), reversed(stand_ins), strict=True):
                graph.backward_graph = torch.cuda.CUDAGraph()
                graph.grad_output = torch.empty_like(graph.output) if following is None else following.grads[0]
                fused = {id(w) for w in _fused_wgrad_weights(graph.layer)}  # the stand-ins, while swapped
                into_main_grad = self.grads_into_main_grad and all(hasattr(p, "main_grad") for p in params)
                with torch.cuda.graph(graph.backward_graph, pool=pool):
                    grad_hidden, *grads = graph.gradients(graph.output, graph.grad_output, params)
                    if into_main_grad:
                        # What Megatron DDP's hook would do per parameter, without the host: add
                        # into the fp32 main_grad (fused weights have theirs added already).
                        for param, grad in zip(params, grads, strict=True):
                            if grad is not None and id(param) not in fused:
                                param.main_grad.add_(grad)
                        grads = [None] * len(grads)
                # A parameter the layer did not use gets no gradient (None), as in eager autograd.
                graph.grads = (grad_hidden, *grads)
                graph.into_main_grad = into_main_grad
                following = graph if CHAIN_BUFFERS and _same_layout(grad_hidden, graph.output) else None


@contextlib.contextmanager
def _stand_in_parameters(layers: list[TransformerLayer]):
    """Swap each layer's trainable parameters for new leaves on the same storage (with the same
    attributes, ``main_grad`` included) for the duration; yields them per layer, in the order
    of the layer's ``parameters()``."""
    swapped, per_layer = [], []
    for layer in layers:
        real = [p for p in layer.parameters() if p.requires_grad]
        stand_ins = {}
        for param in real:
            stand_ins[param] = torch.nn.Parameter(param.detach(), requires_grad=True)
            stand_ins[param].__dict__.update(param.__dict__)
        for module in layer.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param in stand_ins:
                    module._parameters[name] = stand_ins[param]
                    swapped.append((module, name, param))
        per_layer.append([stand_ins[p] for p in real])
    try:
        yield per_layer
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _into_static(static: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into a graph's static input, unless it is that buffer already (a chained
    layer's input is the previous layer's output buffer; its output gradient, the next layer's
    input-gradient buffer)."""
    if not (value.data_ptr() == static.data_ptr() and _same_layout(value, static)):
        static.copy_(value)


def _same_layout(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _main_grad_ptr(param: torch.nn.Parameter) -> int:
    main_grad = getattr(param, "main_grad", None)
    return 0 if main_grad is None else main_grad.data_ptr()


def _fused_wgrad_weights(layer: TransformerLayer) -> list[torch.nn.Parameter]:
    """Weights whose backward adds their gradient straight into ``main_grad``: Megatron's fused
    linears, and modules that name theirs (``weights_into_main_grad``, e.g. stacked experts)."""
    weights = []
    for module in layer.modules():
        weight = getattr(module, "weight", None)
        if (
            getattr(module, "gradient_accumulation_fusion", False)
            and isinstance(weight, torch.nn.Parameter)
            and hasattr(weight, "main_grad")
        ):
            weights.append(weight)
        if hasattr(module, "weights_into_main_grad"):
            weights += module.weights_into_main_grad()
    return weights
