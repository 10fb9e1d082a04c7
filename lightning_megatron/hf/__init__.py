"""Hugging Face <-> Megatron conversion: import into any layout, export from any checkpoint."""

from lightning_megatron.hf.adapters import export_peft, merge_lora_to_hf
from lightning_megatron.hf.convert import export_hf, hf_config, load_hf_weights
from lightning_megatron.hf.families import FAMILIES

__all__ = ["FAMILIES", "export_hf", "export_peft", "hf_config", "load_hf_weights", "merge_lora_to_hf"]
