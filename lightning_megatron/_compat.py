"""Small fixes for megatron-core releases we support, applied once at import."""

from __future__ import annotations


def patch_megatron_core() -> None:
    # megatron-core 0.16.x without Transformer Engine: the fp32 MoE router path reads the name
    # `te_general_gemm`, which is only bound when TE imported; None selects its torch fallback.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # Without TE/apex, Megatron's fused RoPE and weight-gradient-accumulation slots are empty;
    # fill them with torch implementations (used only where a config turns those flags on).
    from lightning_megatron.models import kernels

    kernels.install()

    # megatron-core 0.16.x with torch's Adam (no Apex/TE fused Adam): torch keeps a per-parameter
    # "step" in the optimizer state, but the fully_reshardable checkpoint format stores the step
    # once (in the param groups) and its loader then looks the per-parameter "step" up among the
    # loaded tensors. Hand the existing step back so that copy is a no-op.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_lightning_megatron_patched", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step)
        return original(self, model_param, tensors)

    _set_main_param_and_optimizer_states._lightning_megatron_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
