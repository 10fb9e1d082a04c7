"""The layers the local (Transformer-Engine-free) spec swaps in: SDPA attention, a norm, experts.

Megatron-Core's own local attention materializes the full score matrix (baddbmm + softmax),
its torch norm wrapper refuses sequence parallelism and its local experts loop over one small
GEMM per expert. These keep the local spec fast (torch picks flash / cuDNN SDPA kernels on GPU,
experts run as grouped GEMMs) and let ``sp=True`` work without TE or apex.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


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


class Norm:
    """RMSNorm/LayerNorm from torch that also works with sequence parallelism.

    With ``sp=True`` each tensor-parallel rank normalizes its own slice of the sequence, so the
    norm's weight gradient is partial; the ``sequence_parallel`` attribute tells Megatron's
    ``finalize_model_grads`` to all-reduce it over the TP group.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class GroupedExperts(SequentialMLP):
    """Megatron's ``SequentialMLP`` experts (same parameters, checkpoints and HF mapping), run as
    two ``torch._grouped_mm`` calls over all local experts instead of a Python loop of small GEMMs.

    The per-expert weights are stacked for each forward (a copy of the expert weights, cheap next
    to the GEMMs); gradients flow back to each expert's own parameter, so Megatron DDP's gradient
    buffers and the distributed optimizer see the usual parameters. Falls back to the loop where
    grouped GEMMs are unavailable (CUDA before Hopper or non-bf16 CUDA tensors), with biases,
    tensor-parallel experts, non-SwiGLU activations or wrapped expert linears (LoRA).
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, grouped: bool = True) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        expert_config = self.config
        self.grouped = (
            grouped
            and hasattr(torch, "_grouped_mm")
            and expert_config.gated_linear_unit
            and expert_config.activation_func is F.silu
            and not expert_config.add_bias_linear
            and self.tp_group.size() == 1
            and not (expert_config.fp8 or expert_config.fp4)
            and not expert_config.moe_apply_probs_on_input
            and expert_config.activation_func_clamp_value is None
            and expert_config.glu_linear_offset == 0
        )

    def _grouped_supported(self, hidden: Tensor) -> bool:
        if not self.grouped or self.num_local_experts == 1:
            return False
        # Wrapped expert linears (LoRA swaps in a subclass) must run their own forward.
        if any(
            type(e.linear_fc1) is not ColumnParallelLinear or type(e.linear_fc2) is not RowParallelLinear
            for e in self.local_experts
        ):
            return False
        if hidden.device.type == "cuda":
            return hidden.dtype == torch.bfloat16 and torch.cuda.get_device_capability(hidden.device)[0] >= 9
        return hidden.device.type == "cpu"

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
        hidden = permuted_local_hidden_states
        if not self._grouped_supported(hidden):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        # Row offsets (exclusive ends) of each expert's tokens; stays on the device, no host sync.
        offsets = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])  # [E, 2f, h]
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])  # [E, h, f]
        intermediate = torch._grouped_mm(hidden, fc1.transpose(1, 2), offs=offsets)
        probs = permuted_probs.unsqueeze(-1)
        if self.config.bias_activation_fusion:
            intermediate = weighted_bias_swiglu_impl(intermediate, None, probs)
        else:
            gate, linear = torch.chunk(intermediate, 2, dim=-1)
            intermediate = (F.silu(gate) * linear * probs).to(hidden.dtype)
        return torch._grouped_mm(intermediate, fc2.transpose(1, 2), offs=offsets), None
