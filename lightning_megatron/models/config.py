"""GPTConfig: one plain dataclass for every supported decoder family, with presets and ``from_hf``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch


@dataclass
class RecomputeConfig:
    """Activation recompute (trade compute for memory), as Megatron-Core names it.

    Args:
        granularity: ``"selective"`` (recompute the listed ``modules``) or ``"full"`` (whole layers).
        method: for full recompute, ``"uniform"`` (groups of ``num_layers``) or ``"block"``
            (the first ``num_layers`` layers of each stage).
        num_layers: layers per group (uniform) or per stage (block).
        modules: for selective recompute, e.g. ``["core_attn"]``, ``["mlp"]``, ``["layernorm"]``.
    """

    granularity: Literal["selective", "full"] | None = None
    method: Literal["uniform", "block"] | None = None
    num_layers: int | None = None
    modules: list[str] | None = None

    def to_megatron(self) -> dict[str, Any]:
        if self.granularity is None:
            return {}
        if self.granularity == "full" and (self.method is None or self.num_layers is None):
            raise ValueError(
                "recompute granularity='full' needs method ('uniform' or 'block') and num_layers, "
                "e.g. RecomputeConfig('full', 'uniform', 1)"
            )
        out: dict[str, Any] = {"recompute_granularity": self.granularity}
        if self.granularity == "full":
            out.update(recompute_method=self.method, recompute_num_layers=self.num_layers)
        if self.modules is not None:
            out["recompute_modules"] = list(self.modules)
        return out


@dataclass
class GPTConfig:
    """Shape and architecture of a decoder-only (dense or MoE) language model.

    The defaults describe a small Llama-style model; use :meth:`preset` for a family's flags and
    :meth:`from_hf` to read a Hugging Face ``config.json``.

    Example::

        GPTConfig.preset("qwen2", num_layers=4, hidden_size=256, ffn_hidden_size=512)
    """

    family: str = "llama"
    vocab_size: int = 32000
    num_layers: int = 2
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention (= num_attention_heads)
    ffn_hidden_size: int = 688
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style {"rope_type": "llama3", "factor": 8}
    norm_eps: float = 1e-5
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    # Mixture of experts (num_experts=None means dense).
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False  # True: softmax over all experts, then top-k, no renorm
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    extra: dict[str, Any] = field(default_factory=dict)  # passed to TransformerConfig as is

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts and self.moe_router_topk > self.num_experts:
            raise ValueError(f"moe_router_topk={self.moe_router_topk} exceeds num_experts={self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up so every tensor-parallel rank holds an equal slice.

        The multiple does not depend on ``tp`` when it is already divisible by it, so the same
        model has the same shape (and the same initial weights) under every layout.
        """
        multiple = self.make_vocab_size_divisible_by
        if multiple % tp:
            multiple = math.lcm(multiple, tp)
        return math.ceil(self.vocab_size / multiple) * multiple

    @classmethod
    def preset(cls, family: str, **overrides: Any) -> GPTConfig:
        """A family's architecture flags and the shape of its smallest public model.

        Families: ``llama``, ``qwen2``, ``qwen3``, ``mistral`` (dense); ``mixtral``, ``qwen2_moe``,
        ``qwen3_moe`` (MoE). Any field can be overridden, e.g. ``num_layers=4``.
        """
        if family not in PRESETS:
            raise ValueError(f"unknown family {family!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[family], "family": family, **overrides}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_hf(cls, source: str | Path | Any) -> GPTConfig:
        """Build from a Hugging Face model directory, ``config.json`` path or ``PretrainedConfig``."""
        hf = _read_hf_config(source)
        model_type = hf.get("model_type")
        if model_type not in PRESETS:
            raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: {sorted(PRESETS)}")
        heads = hf["num_attention_heads"]
        values: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf.get("intermediate_size") or hf.get("moe_intermediate_size"),
            kv_channels=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_of(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_method_std=hf.get("initializer_range", 0.02),
            make_vocab_size_divisible_by=1,
        )
        if model_type == "qwen2":
            values["add_qkv_bias"] = True
        if model_type in ("mixtral",):
            values.update(
                num_experts=hf["num_local_experts"],
                moe_router_topk=hf["num_experts_per_tok"],
                moe_ffn_hidden_size=hf["intermediate_size"],
            )
        if model_type in ("qwen2_moe", "qwen3_moe"):
            values.update(
                num_experts=hf.get("num_experts") or hf["num_local_experts"],
                moe_router_topk=hf["num_experts_per_tok"],
                moe_ffn_hidden_size=hf["moe_intermediate_size"],
                moe_router_pre_softmax=not hf.get("norm_topk_prob", model_type == "qwen3_moe"),
            )
        if model_type == "qwen2_moe":
            values.update(
                add_qkv_bias=True,
                moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size"),
                moe_shared_expert_gate=True,
            )
        return cls.preset(model_type, **values)

    def to_transformer_config(self, **parallel_and_precision: Any):
        """Megatron-Core's ``TransformerConfig`` for this model plus layout/precision fields."""
        from megatron.core.transformer import TransformerConfig

        moe: dict[str, Any] = {}
        if self.is_moe:
            moe = dict(
                num_moe_experts=self.num_experts,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size or self.ffn_hidden_size,
                moe_router_topk=self.moe_router_topk,
                moe_router_pre_softmax=self.moe_router_pre_softmax,
                moe_router_load_balancing_type="aux_loss" if self.moe_aux_loss_coeff else "none",
                moe_aux_loss_coeff=self.moe_aux_loss_coeff,
                moe_z_loss_coeff=self.moe_z_loss_coeff,
                moe_token_dispatcher_type=self.moe_token_dispatcher_type,
                moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
                moe_shared_expert_gate=self.moe_shared_expert_gate,
                moe_router_dtype="fp32",
            )
        values = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            # Megatron's own init also tags tensor-parallel weights (grad norm and clipping rely
            # on the tags); lightning_megatron.models.init then overwrites the values so they
            # are the same under every layout.
            perform_initialization=True,
            # Gradients are scaled by 1 / (tokens in the global batch), so the loss is the
            # token-weighted mean whatever the microbatch count or data-parallel size.
            calculate_per_token_loss=True,
            **moe,
        )
        values.update(self.extra)
        values.update(parallel_and_precision)
        return TransformerConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rope_scaling_of(hf: dict[str, Any]) -> dict[str, Any] | None:
    # transformers < 5 writes "rope_scaling"; 5.x folds it into "rope_parameters" with the theta.
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def _read_hf_config(source: str | Path | Any) -> dict[str, Any]:
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}; pass a model directory or config.json")
    return json.loads(path.read_text())


# Flags of each family plus the shape of its smallest public model (override any of them).
_LLAMA = dict(
    vocab_size=32000,
    num_layers=22,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=4,
    ffn_hidden_size=5632,
    rope_theta=10000.0,
    norm_eps=1e-5,
)
PRESETS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": dict(
        _LLAMA,
        num_layers=32,
        hidden_size=4096,
        num_query_groups=8,
        ffn_hidden_size=14336,
        rope_theta=1e6,
        vocab_size=32768,
    ),
    "qwen2": dict(
        vocab_size=151936,
        num_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_query_groups=2,
        ffn_hidden_size=4864,
        rope_theta=1e6,
        norm_eps=1e-6,
        add_qkv_bias=True,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        vocab_size=151936,
        num_layers=28,
        hidden_size=1024,
        num_attention_heads=16,
        num_query_groups=8,
        kv_channels=128,
        ffn_hidden_size=3072,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_layernorm=True,
        tie_word_embeddings=True,
    ),
    "mixtral": dict(
        _LLAMA,
        num_layers=32,
        hidden_size=4096,
        num_query_groups=8,
        ffn_hidden_size=14336,
        rope_theta=1e6,
        num_experts=8,
        moe_router_topk=2,
        moe_aux_loss_coeff=0.02,
    ),
    "qwen2_moe": dict(
        vocab_size=151936,
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=16,
        ffn_hidden_size=5632,
        moe_ffn_hidden_size=1408,
        rope_theta=1e6,
        norm_eps=1e-6,
        add_qkv_bias=True,
        num_experts=60,
        moe_router_topk=4,
        moe_router_pre_softmax=True,
        moe_shared_expert_intermediate_size=5632,
        moe_shared_expert_gate=True,
        moe_aux_loss_coeff=0.001,
    ),
    "qwen3_moe": dict(
        vocab_size=151936,
        num_layers=48,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
        ffn_hidden_size=6144,
        moe_ffn_hidden_size=768,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_layernorm=True,
        num_experts=128,
        moe_router_topk=8,
        moe_aux_loss_coeff=0.001,
    ),
}
