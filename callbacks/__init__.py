"""Callbacks for MegatronStrategy training, installed as ``lightning_megatron.callbacks``."""

from lightning_megatron.callbacks.dpo import DPO
from lightning_megatron.callbacks.freeze import Freeze
from lightning_megatron.callbacks.lora import LoRA
from lightning_megatron.callbacks.throughput import ThroughputMonitor, model_flops_per_token

__all__ = ["DPO", "Freeze", "LoRA", "ThroughputMonitor", "model_flops_per_token"]
