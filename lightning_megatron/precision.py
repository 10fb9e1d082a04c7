"""Trainer ``precision=...`` mapped onto Megatron-Core's own mixed precision.

Megatron does mixed precision itself: 16-bit parameters (``Float16Module``), fp32 master weights
inside its optimizer, fp32 gradient reduction and, for fp16, dynamic loss scaling. So this plugin
does no autocast; it tells the model and optimizer configs which dtypes to use.

=============  ===========  ==================  ===================================
Trainer        parameters   gradient reduction  notes
=============  ===========  ==================  ===================================
``32-true``    fp32         fp32
``bf16-mixed`` bf16         fp32                fp32 master weights in the optimizer
``bf16-true``  bf16         bf16                fp32 master weights in the optimizer
``16-mixed``   fp16         fp32                dynamic loss scaling, skip on inf/nan
=============  ===========  ==================  ===================================
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision

SUPPORTED = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
}
_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class MegatronPrecision(Precision):
    """Lightning precision plugin for :class:`~lightning_megatron.MegatronStrategy`."""

    def __init__(self, precision: str = "32-true") -> None:
        precision = _ALIASES.get(str(precision), str(precision))
        if precision not in SUPPORTED:
            raise ValueError(
                f"precision={precision!r} is not supported by MegatronStrategy; choose one of "
                f"{sorted(SUPPORTED)} (fp8 is a strategy option: MegatronStrategy(fp8='hybrid'))"
            )
        self.precision = precision

    @property
    def params_dtype(self) -> torch.dtype:
        return SUPPORTED[self.precision]

    def transformer_config_kwargs(self) -> dict[str, Any]:
        dtype = self.params_dtype
        return dict(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
        )

    def optimizer_kwargs(self) -> dict[str, Any]:
        dtype = self.params_dtype
        return dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)

    @property
    def grad_reduce_in_fp32(self) -> bool:
        return self.precision != "bf16-true"

    def _clip_gradients(self, *args: Any, **kwargs: Any) -> None:
        # Megatron's optimizer clips by the global norm (over all parallel ranks) in step();
        # the Trainer's gradient_clip_val is carried into its config by the strategy.
        return None
