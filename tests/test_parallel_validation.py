"""Every layout/model mismatch is refused with a message naming the value and the fix."""

from __future__ import annotations

import pytest

from lightning_megatron import GPTConfig, MegatronPrecision, ParallelConfig
from lightning_megatron._version import check_megatron_core

DENSE = GPTConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)
MOE = GPTConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, num_experts=4)


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(tp=3), 4, r"tp\*pp\*cp=3\*1\*1=3 does not divide the world size 4"),
        (dict(tp=2, pp=2), 6, r"does not divide the world size 6"),
        (dict(sp=True), 2, r"sp=True .* needs tp > 1"),
        (dict(vpp=2), 2, r"vpp=2 needs pipeline parallelism"),
        (dict(ep=4), 2, r"ep\*etp\*pp=4\*1\*1=4 does not divide the world size 2"),
        (dict(tp=0), 2, r"tp=0 must be a positive integer"),
    ],
)
def test_world_size_errors(layout, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**layout).validate(world)


@pytest.mark.parametrize(
    "layout, config, message",
    [
        (dict(tp=8), DENSE, r"tp=8 does not divide num_attention_heads=4; choose tp in \[1, 2, 4\]"),
        (dict(tp=4), DENSE, r"tp=4 does not divide num_query_groups=2"),
        (dict(pp=3), DENSE, r"pp=3 does not divide num_layers=4"),
        (dict(pp=2, vpp=4), DENSE, r"pp\*vpp=2\*4=8 does not divide num_layers=4"),
        (dict(ep=3), MOE, r"ep=3 does not divide num_experts=4"),
        (dict(ep=2), DENSE, r"ep=2 needs an MoE model"),
        (dict(tp=2), MOE, r"MoE model with tp=2 needs sequence parallelism"),
    ],
)
def test_model_errors(layout, config, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**layout).validate_model(config)


def test_context_parallel_needs_sequence_divisible_by_2cp():
    with pytest.raises(ValueError, match=r"cp=2 needs the sequence length divisible by 2\*cp=4"):
        ParallelConfig(cp=2).validate_sequence(30)
    ParallelConfig(cp=2).validate_sequence(32)


def test_sequence_parallel_needs_sequence_divisible_by_tp():
    with pytest.raises(ValueError, match=r"sp=True with tp=4 needs the sequence length divisible by tp"):
        ParallelConfig(tp=4, sp=True).validate_sequence(30)


def test_context_parallel_without_transformer_engine_is_refused():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from lightning_megatron.models.layers import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2)
    with pytest.raises(ValueError, match=r"cp=2 needs Transformer Engine"):
        SDPAttention(config, 1, AttnMaskType.causal, "self")


def test_megatron_core_too_old_or_missing():
    with pytest.raises(ImportError, match=r"megatron-core 0.15.2 is too old; .* >= 0.16.1"):
        check_megatron_core("0.15.2")
    check_megatron_core("0.16.1")
    check_megatron_core("0.17.0rc1")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"precision='64-true' is not supported"):
        MegatronPrecision("64-true")


def test_fp8_without_transformer_engine_is_refused():
    from lightning_megatron import MegatronStrategy
    from lightning_megatron.models.specs import te_available

    if te_available():
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ValueError, match=r"fp8='hybrid' needs Transformer Engine"):
        MegatronStrategy(fp8="hybrid")


def test_moe_router_topk_above_experts():
    with pytest.raises(ValueError, match=r"moe_router_topk=8 exceeds num_experts=4"):
        GPTConfig(num_experts=4, moe_router_topk=8)
