"""Which Hugging Face tensors make each Megatron tensor, per model family.

A table maps a Megatron checkpoint key (layers stacked: ``decoder.layers.X`` covers every layer)
to HF names, with ``{layer}`` and ``{expert}`` filled in, and a transform:

- ``"copy"``: one tensor as is;
- ``"vocab"``: embedding/output rows, padded to Megatron's padded vocabulary;
- ``"qkv"``: q, k, v fused per query group (GQA interleaving);
- ``"cat"``: gate and up projections stacked (Megatron's fused SwiGLU ``linear_fc1``).

Adding a family is a new table here (usually a few lines on top of ``LLAMA``) plus its entry in
``FAMILIES`` and a ``GPTConfig`` preset.
"""

from __future__ import annotations

Table = dict[str, tuple[str, tuple[str, ...]]]

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

LLAMA: Table = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
    "decoder.final_layernorm.weight": ("copy", ("model.norm.weight",)),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (
        "copy",
        ("model.layers.{layer}.input_layernorm.weight",),
    ),
    "decoder.layers.self_attention.linear_qkv.weight": (
        "qkv",
        (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
    ),
    "decoder.layers.self_attention.linear_qkv.bias": (
        "qkv",
        (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
    ),
    "decoder.layers.self_attention.linear_proj.weight": ("copy", (f"{_ATTN}.o_proj.weight",)),
    "decoder.layers.self_attention.q_layernorm.weight": ("copy", (f"{_ATTN}.q_norm.weight",)),
    "decoder.layers.self_attention.k_layernorm.weight": ("copy", (f"{_ATTN}.k_norm.weight",)),
    # Dense MLP: the pre-MLP norm is fused into fc1 (Transformer Engine's naming).
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (
        "copy",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
    ),
    "decoder.layers.mlp.linear_fc1.weight": ("cat", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight")),
    "decoder.layers.mlp.linear_fc2.weight": ("copy", (f"{_MLP}.down_proj.weight",)),
}

# MoE layers: the pre-MLP norm is its own tensor under Transformer Engine's spec, and keyed as
# in the dense case under the local spec.
_MOE_COMMON: Table = {
    key: value
    for key, value in LLAMA.items()
    if not key.startswith("decoder.layers.mlp.") or key.endswith("layer_norm_weight")
} | {"decoder.layers.pre_mlp_layernorm.weight": ("copy", ("model.layers.{layer}.post_attention_layernorm.weight",))}

QWEN_MOE: Table = _MOE_COMMON | {
    "decoder.layers.mlp.router.weight": ("copy", (f"{_MLP}.gate.weight",)),
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": (
        "cat",
        (f"{_MLP}.experts.{{expert}}.gate_proj.weight", f"{_MLP}.experts.{{expert}}.up_proj.weight"),
    ),
    "decoder.layers.mlp.experts.experts.linear_fc2.weight": ("copy", (f"{_MLP}.experts.{{expert}}.down_proj.weight",)),
    "decoder.layers.mlp.shared_experts.linear_fc1.weight": (
        "cat",
        (f"{_MLP}.shared_expert.gate_proj.weight", f"{_MLP}.shared_expert.up_proj.weight"),
    ),
    "decoder.layers.mlp.shared_experts.linear_fc2.weight": ("copy", (f"{_MLP}.shared_expert.down_proj.weight",)),
    "decoder.layers.mlp.shared_experts.gate_weight": ("copy", (f"{_MLP}.shared_expert_gate.weight",)),
}

_SPARSE = "model.layers.{layer}.block_sparse_moe"
MIXTRAL: Table = _MOE_COMMON | {
    "decoder.layers.mlp.router.weight": ("copy", (f"{_SPARSE}.gate.weight",)),
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": (
        "cat",
        (f"{_SPARSE}.experts.{{expert}}.w1.weight", f"{_SPARSE}.experts.{{expert}}.w3.weight"),
    ),
    "decoder.layers.mlp.experts.experts.linear_fc2.weight": ("copy", (f"{_SPARSE}.experts.{{expert}}.w2.weight",)),
}

# Hugging Face model_type -> (table, architecture class name)
FAMILIES: dict[str, tuple[Table, str]] = {
    "llama": (LLAMA, "LlamaForCausalLM"),
    "mistral": (LLAMA, "MistralForCausalLM"),
    "qwen2": (LLAMA, "Qwen2ForCausalLM"),
    "qwen3": (LLAMA, "Qwen3ForCausalLM"),
    "mixtral": (MIXTRAL, "MixtralForCausalLM"),
    "qwen2_moe": (QWEN_MOE, "Qwen2MoeForCausalLM"),
    "qwen3_moe": (QWEN_MOE, "Qwen3MoeForCausalLM"),
}


def family_table(family: str) -> Table:
    if family not in FAMILIES:
        raise ValueError(f"no Hugging Face mapping for family {family!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[family][0]
