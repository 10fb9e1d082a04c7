"""Megatron-Core training in PyTorch Lightning.

import lightning as L
from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy

model = GPTModule(GPTConfig.preset("qwen2", num_layers=4, hidden_size=256), lr=3e-4)
trainer = L.Trainer(strategy=MegatronStrategy(tp=2), devices=2, max_steps=20)
trainer.fit(model, train_dataloaders=loader)
"""

from lightning_megatron._version import check_megatron_core

check_megatron_core()

from lightning_megatron._compat import patch_megatron_core  # noqa: E402

patch_megatron_core()

from lightning_megatron.checkpoint import CheckpointError, MegatronCheckpointIO, versioned_dir  # noqa: E402
from lightning_megatron.hf import export_hf  # noqa: E402
from lightning_megatron.models.config import GPTConfig, RecomputeConfig  # noqa: E402
from lightning_megatron.models.gpt import GPTModule  # noqa: E402
from lightning_megatron.optim import warmup_decay_lr  # noqa: E402
from lightning_megatron.parallel import ParallelConfig  # noqa: E402
from lightning_megatron.precision import MegatronPrecision  # noqa: E402
from lightning_megatron.strategy import MegatronStrategy  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "GPTConfig",
    "GPTModule",
    "MegatronCheckpointIO",
    "MegatronPrecision",
    "MegatronStrategy",
    "ParallelConfig",
    "RecomputeConfig",
    "export_hf",
    "versioned_dir",
    "warmup_decay_lr",
]
