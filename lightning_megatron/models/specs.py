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

from lightning_megatron.models.layers import FusedQKVSelfAttention, GatedSharedExperts, Norm, SDPAttention
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
    compiled_norm: bool = True,
    fused_shared_gate: bool = True,
    fused_qkv: bool = True,
) -> ModuleSpec:
    """The decoder block for this pipeline stage.

    The local spec uses :class:`SDPAttention`, :class:`Norm` (``compiled_norm``: compiled RMSNorm
    on CUDA) and (``grouped_experts``) grouped-GEMM experts instead of mcore's baddbmm attention,
    its torch-norm wrapper and its loop over experts: :class:`StackedExperts` where it applies
    (and ``stacked_experts``), else :class:`GroupedExperts`; with ``fused_shared_gate`` the
    shared experts' gate is :class:`GatedSharedExperts`' compiled one, and with ``fused_qkv`` the
    attention's QKV bias, head split and RoPE are :class:`FusedQKVSelfAttention`'s one function.
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
    norm = ModuleSpec(module=Norm, params={"compiled": compiled_norm})
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    if fused_qkv:
        layer.submodules.self_attention.module = FusedQKVSelfAttention
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if config.qk_layernorm:
        attention.q_layernorm = norm
        attention.k_layernorm = norm
    if config.num_moe_experts:
        if fused_shared_gate and layer.submodules.mlp.submodules.shared_experts is not None:
            layer.submodules.mlp.submodules.shared_experts.module = GatedSharedExperts
        experts = layer.submodules.mlp.submodules.experts
        if grouped_experts and stacked_experts and stacked_experts_supported(config):
            experts.module = StackedExperts
        else:
            experts.module, experts.params = GroupedExperts, {"grouped": grouped_experts}
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm),
    )
