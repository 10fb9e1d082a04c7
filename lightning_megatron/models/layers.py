"""The layers the local (Transformer-Engine-free) spec swaps in: SDPA attention and a norm
(its experts: :mod:`lightning_megatron.models.moe`).

Megatron-Core's own local attention materializes the full score matrix (baddbmm + softmax) and
its torch norm wrapper refuses sequence parallelism. These keep the local spec fast (torch picks
flash / cuDNN SDPA kernels on GPU) and let ``sp=True`` work without TE or apex.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
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
