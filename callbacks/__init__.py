"""Callbacks for MegatronStrategy training, installed as ``lightning_megatron.callbacks``."""

from lightning_megatron.callbacks.throughput import ThroughputMonitor, model_flops_per_token

__all__ = ["ThroughputMonitor", "model_flops_per_token"]
