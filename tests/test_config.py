"""GPTConfig presets and from_hf for every supported family."""

from __future__ import annotations

import pytest
import transformers

from lightning_megatron import GPTConfig

SMALL = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    "hf_config, expected",
    [
        (transformers.LlamaConfig(**SMALL), dict(family="llama", add_qkv_bias=False, num_query_groups=2)),
        (transformers.Qwen2Config(**SMALL), dict(family="qwen2", add_qkv_bias=True)),
        (transformers.Qwen3Config(**SMALL, head_dim=32), dict(family="qwen3", qk_layernorm=True, kv_channels=32)),
        (transformers.MistralConfig(**SMALL), dict(family="mistral")),
        (
            transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
            dict(family="mixtral", num_experts=4, moe_router_topk=2, moe_router_pre_softmax=False),
        ),
        (
            transformers.Qwen2MoeConfig(
                **SMALL,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
            ),
            dict(
                family="qwen2_moe",
                moe_shared_expert_gate=True,
                moe_shared_expert_intermediate_size=64,
                moe_router_pre_softmax=True,
            ),
        ),
        (
            transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
            dict(family="qwen3_moe", moe_ffn_hidden_size=32, num_experts=4),
        ),
    ],
    ids=lambda v: getattr(v, "model_type", ""),
)
def test_from_hf(hf_config, expected, tmp_path):
    hf_config.save_pretrained(tmp_path)
    for source in (hf_config, tmp_path, tmp_path / "config.json"):
        config = GPTConfig.from_hf(source)
        assert (config.num_layers, config.hidden_size, config.vocab_size) == (2, 64, 100)
        for field, value in expected.items():
            assert getattr(config, field) == value, field


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported Hugging Face model_type 'gpt2'; supported: \['llama'"):
        GPTConfig.from_hf(transformers.GPT2Config())


def test_presets_override_and_refuse_unknown():
    config = GPTConfig.preset("qwen2", num_layers=4, hidden_size=256)
    assert (config.num_layers, config.hidden_size, config.add_qkv_bias) == (4, 256, True)
    with pytest.raises(ValueError, match="unknown family 'gpt5'"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['hidden'\]"):
        GPTConfig.preset("qwen2", hidden=3)


def test_padded_vocab_is_the_same_for_every_tp():
    config = GPTConfig(vocab_size=257)
    assert {config.padded_vocab_size(tp) for tp in (1, 2, 4, 8)} == {384}
