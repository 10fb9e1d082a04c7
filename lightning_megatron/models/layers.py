"""The layers the local (Transformer-Engine-free) spec swaps in: SDPA attention, a norm and the
shared experts' gate (its routed experts: :mod:`lightning_megatron.models.moe`).

Megatron-Core's own local attention materializes the full score matrix (baddbmm + softmax) and
its torch norm wrapper refuses sequence parallelism. These keep the local spec fast (torch picks
flash / cuDNN SDPA kernels on GPU) and let ``sp=True`` work without TE or apex.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_megatron.models.kernels import compiled_on_cuda, rope_half


class SDPAttention(MegatronModule):
    """Core attention over ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor and forward contract as ``megatron.core``'s ``DotProductAttention``:
    query ``[s, b, heads/tp, d]``, key/value ``[s, b, groups/tp, d]`` in, ``[s, b, heads/tp*d]``
    out. Grouped-query attention is handled by SDPA itself (no repeated K/V in memory).

    ``cuda_backends`` orders the SDPA kernels torch tries on CUDA (None: torch's own order);
    cuDNN's kernel takes no grouped K/V, so K/V heads are repeated when it comes first.
    """

    cuda_backends: tuple[SDPBackend, ...] | None = None

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                f"cp={config.context_parallel_size} needs Transformer Engine's attention "
                "(ring attention); install the `te` extra or set cp=1"
            )
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs Transformer Engine's attention")
        if packed_seq_params is not None:
            return self._thd(query, key, value, packed_seq_params)
        mask_type = attn_mask_type or self.attn_mask_type
        seq, batch, heads, dim = query.shape
        # SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            # Megatron's masks are True where attention is *not* allowed.
            mask = ~attention_mask
        backends = self.cuda_backends if q.is_cuda else None
        if backends and backends[0] == SDPBackend.CUDNN_ATTENTION and k.shape[1] != heads:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel(list(backends), set_priority=True) if backends else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    def _thd(self, query: Tensor, key: Tensor, value: Tensor, packed_seq_params) -> Tensor:
        """Packed sequences in THD format (``[t, heads, d]``, Megatron squeezed the batch of one):
        one causal SDPA per sequence of ``cu_seqlens``, so each keeps flash-attention kernels."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"packed qkv_format={packed_seq_params.qkv_format!r}; only 'thd' is supported")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        heads, dim = query.shape[1], query.shape[2]
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != heads,
            )
            pieces.append(out[0].transpose(0, 1))
        return torch.cat(pieces).reshape(query.shape[0], heads * dim)


# Attention inputs that take Megatron's own path: cross attention, inference, packed sequences,
# and RoPE given as cos/sin (flash decoding).
_UNFUSED_IF_GIVEN = (
    "key_value_states",
    "inference_context",
    "inference_params",
    "packed_seq_params",
    "rotary_pos_cos",
    "rotary_pos_sin",
    "rotary_pos_cos_sin",
)


class FusedQKVSelfAttention(SelfAttention):
    """Megatron's self-attention with the QKV bias, the split into heads and RoPE as one compiled
    function on CUDA (eager elsewhere).

    Megatron adds the QKV bias in its own kernel, copies the query heads out of the fused QKV
    output (they are interleaved with the key and value heads of their group) and rotates query
    and key in two more passes; the backward concatenates the three gradients and sums the bias
    gradient in two more. On the Qwen2-MoE benchmark shape that is about 230 us per layer and
    microbatch on an H100 for what is one read and one write of the QKV output each way.

    Applies where RoPE is plain (non-interleaved, unscaled, on every layer), without packed
    sequences, inference, qk-norm, output gate or more TP ranks than KV groups; everything else
    is Megatron's own path. Same parameters and checkpoints.
    """

    _freqs: Tensor | None = None  # the RoPE frequencies of the call in flight (see forward)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, *args, **kwargs):
        rope = kwargs.get("rotary_pos_emb")
        if isinstance(rope, tuple) and len(rope) == 2 and rope[0] is rope[1]:
            rope = rope[0]
        if not (isinstance(rope, Tensor) and not args and self._fusable(kwargs)):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        # RoPE is applied with the split (get_query_key_value_tensors below), so Megatron's
        # forward is called without it.
        self._freqs = rope
        try:
            return super().forward(hidden_states, attention_mask, **(kwargs | {"rotary_pos_emb": None}))
        finally:
            self._freqs = None

    def _fusable(self, kwargs: dict) -> bool:
        config = self.config
        return (
            all(kwargs.get(k) is None for k in _UNFUSED_IF_GIVEN)
            and not config.rotary_interleaved
            and not config.multi_latent_attention
            and config.mrope_section is None
            and not config.no_rope_freq
            and not config.attention_output_gate
            and _yarn_get_concentration_factor_from_config(config) == 1.0
            and all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm, self.k_layernorm))
            and config.num_query_groups >= self.world_size
        )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if self._freqs is None or output_gate or not split_qkv:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        linear = self.linear_qkv
        linear.skip_bias_add = True  # the bias is added in the fused function
        try:
            mixed, bias = linear(hidden_states)
        finally:
            linear.skip_bias_add = False
        groups = self.num_query_groups_per_partition
        return _qkv_rope(
            mixed, bias, self._freqs, groups, self.num_attention_heads_per_partition // groups,
            self.hidden_size_per_attention_head,
        )  # fmt: skip


@compiled_on_cuda
def _qkv_rope(mixed: Tensor, bias: Tensor | None, freqs: Tensor, groups: int, q_per_group: int, head_dim: int):
    # Megatron's QKV layout: per KV group, its query heads, then its key head, then its value head.
    if bias is not None:
        mixed = mixed + bias
    seq, batch = mixed.shape[:2]
    heads = mixed.view(seq, batch, groups, q_per_group + 2, head_dim)
    query = heads[:, :, :, :q_per_group].reshape(seq, batch, groups * q_per_group, head_dim)
    key, value = heads[:, :, :, q_per_group], heads[:, :, :, q_per_group + 1]
    return rope_half(query, freqs), rope_half(key, freqs), value.contiguous()


class Norm:
    """RMSNorm/LayerNorm from torch that also works with sequence parallelism.

    With ``sp=True`` each tensor-parallel rank normalizes its own slice of the sequence, so the
    norm's weight gradient is partial; the ``sequence_parallel`` attribute tells Megatron's
    ``finalize_model_grads`` to all-reduce it over the TP group. ``compiled`` RMSNorm runs
    through ``torch.compile`` on CUDA (see :class:`CompiledRMSNorm`).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, compiled: bool = False, **_):
        if config.normalization == "RMSNorm":
            rms = CompiledRMSNorm if compiled else torch.nn.RMSNorm
            norm: torch.nn.Module = rms(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@compiled_on_cuda
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class CompiledRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` through ``torch.compile`` on CUDA (eager elsewhere): the same function,
    but its backward is one fused kernel for the input gradient plus a split reduction for the
    weight's, where ATen's runs a slow two-pass weight-gradient kernel (38 us of 67 per norm on
    the Qwen2-MoE benchmark shape, docs/benchmarks.md)."""

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


class GatedSharedExperts(SharedExpertMLP):
    """Megatron's shared experts with the sigmoid gate (Qwen2-MoE's ``shared_expert_gate``) as one
    compiled function on CUDA: ``output * sigmoid(hidden @ gate_weight.T)``.

    Megatron computes the gate as a GEMM with one output column, a sigmoid and a broadcast
    multiply, and its backward as five more kernels (two of them GEMMs with a single column) plus
    their gradient adds: about 240 us per layer and microbatch on the benchmark's shape, for a
    1 x hidden weight. Compiled, each direction is a row-wise kernel (and a column sum for the
    weight's gradient). Same parameters, checkpoints and rounding points (the logits, the gate
    and the product are rounded to the input dtype, as in Megatron's bf16 ops).
    """

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not self.use_shared_expert_gate or self.config.moe_shared_expert_overlap:
            return super().forward(hidden_states)
        output, _ = MLP.forward(self, hidden_states)
        return _SharedExpertGate.apply(hidden_states, output, self.gate_weight)


@compiled_on_cuda
def _gate_forward(x: Tensor, out: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    logits = (x.float() * weight.float()).sum(-1, keepdim=True).to(x.dtype)
    gate = torch.sigmoid(logits.float()).to(x.dtype)
    return (out.float() * gate.float()).to(out.dtype), gate


@compiled_on_cuda
def _gate_backward(grad: Tensor, x: Tensor, out: Tensor, weight: Tensor, gate: Tensor):
    g = gate.float()
    grad_out = (grad.float() * g).to(out.dtype)
    grad_gate = (grad.float() * out.float()).sum(-1, keepdim=True).to(gate.dtype)
    grad_logits = (grad_gate.float() * g * (1.0 - g)).to(x.dtype)
    grad_x = (grad_logits.float() * weight.float()).to(x.dtype)
    grad_weight = (grad_logits.float() * x.float()).sum(0, keepdim=True).to(weight.dtype)
    return grad_x, grad_out, grad_weight


class _SharedExpertGate(torch.autograd.Function):
    """``out * sigmoid(x @ weight.T)`` for ``x``, ``out`` of ``[..., hidden]`` and ``weight`` of
    ``[1, hidden]``."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, weight: Tensor) -> Tensor:
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        result, gate = _gate_forward(flat_x, flat_out, weight)
        ctx.save_for_backward(flat_x, flat_out, weight, gate)
        return result.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat_x, flat_out, weight, gate = ctx.saved_tensors
        grad_x, grad_out, grad_weight = _gate_backward(grad.reshape(flat_out.shape), flat_x, flat_out, weight, gate)
        return grad_x.view(grad.shape[:-1] + flat_x.shape[-1:]), grad_out.view_as(grad), grad_weight
