"""Small fixes for megatron-core releases we support, applied once at import."""

from __future__ import annotations


def patch_megatron_core() -> None:
    # megatron-core 0.16.x without Transformer Engine: the fp32 MoE router path reads the name
    # `te_general_gemm`, which is only bound when TE imported; None selects its torch fallback.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
