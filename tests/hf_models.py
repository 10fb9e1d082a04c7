"""Tiny random Hugging Face models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)

CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        ),
    ),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=64, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, head_dim=16, decoder_sparse_step=1)),
}


def make_hf_model(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a random fp32 model of ``family`` to ``directory`` (weights drawn with std 0.1, so
    every layer matters in the logits); ``overrides`` change the config (``vocab_size=512``)."""
    import transformers

    name, extra = CONFIGS[family]
    config = getattr(transformers, name)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits
