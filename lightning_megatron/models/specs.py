"""Layer specs: Transformer Engine's when it is importable (and we are on GPU), else the local one."""

from __future__ import annotations

import functools
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from lightning_megatron.models.layers import Norm, SDPAttention
from lightning_megatron.models.moe import GroupedExperts, StackedExperts, stacked_experts_supported


@functools.cache
def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def block_spec(
    config: TransformerConfig,
    use_te: bool,
    vp_stage: int | None = None,
    grouped_experts: bool = True,
    stacked_experts: bool = True,
) -> ModuleSpec:
    """The decoder block for this pipeline stage.

    The local spec uses :class:`SDPAttention`, :class:`Norm` and (``grouped_experts``) grouped-GEMM
    experts instead of mcore's baddbmm attention, its torch-norm wrapper and its loop over experts:
    :class:`StackedExperts` where it applies (and ``stacked_experts``), else :class:`GroupedExperts`.
    With ``use_te`` it is Megatron's TE spec unchanged.
    """
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_decoder_block_spec,
        )

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    layer = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=False,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
    )
    layer.submodules.input_layernorm = Norm
    layer.submodules.pre_mlp_layernorm = Norm
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if config.qk_layernorm:
        attention.q_layernorm = Norm
        attention.k_layernorm = Norm
    if config.num_moe_experts:
        experts = layer.submodules.mlp.submodules.experts
        if grouped_experts and stacked_experts and stacked_experts_supported(config):
            experts.module = StackedExperts
        else:
            experts.module, experts.params = GroupedExperts, {"grouped": grouped_experts}
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=Norm),
    )
