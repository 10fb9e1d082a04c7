"""LoRA adapters out of torch_dist checkpoints: PEFT directories, and adapters merged into HF models.

Megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``; an adapter on a fused
linear is one ``A`` shared by the parts and one ``B`` whose rows are the parts' rows. So the PEFT
form is exact: each part gets the shared ``A`` and its rows of ``B`` (the base weight's own
transform, applied to ``B``), and ``B_part @ A`` is exactly that part's update.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lightning_megatron.hf.convert import (
    SafetensorsReader,
    ShardWriter,
    _stacked_tensors,
    _tied_output,
    _unstack,
    _write_config,
    from_megatron,
)
from lightning_megatron.hf.families import family_table
from lightning_megatron.models.config import GPTConfig

PEFT_PREFIX = "base_model.model."


def _adapter_info(adapters: str | os.PathLike) -> tuple[dict, GPTConfig]:
    from lightning_megatron.checkpoint import CheckpointError, read_info

    info = read_info(adapters)
    if "lora" not in info:
        raise CheckpointError(f"{adapters} holds no LoRA adapters (it was not saved with the LoRA callback)")
    return info, GPTConfig(**info["model_config"])


def _scale(lora: dict) -> float:
    from lightning_megatron.lora import LoRAConfig

    return LoRAConfig(r=lora["r"], alpha=lora["alpha"], use_rslora=lora["use_rslora"]).scale


def _saved_keys(table: dict, lora: dict) -> list[str]:
    """The checkpoint keys of the LoRA run's ``modules_to_save`` (trained whole, saved with the adapters)."""
    return [k for k in table if any(k.startswith(p) for p in lora.get("modules_to_save", []))]


def _lora_pairs(adapters: Path, table: dict, progress: bool) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(base key, A, B)`` stacked over layers (and experts), one linear family at a time."""
    keys = [k.replace(".weight", f".lora_{x}.weight") for k in table if k.endswith(".weight") for x in "AB"]
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in _stacked_tensors(adapters, keys, progress):
        loaded[key] = tensor
        base = key.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        a, b = base.replace(".weight", ".lora_A.weight"), base.replace(".weight", ".lora_B.weight")
        if a in loaded and b in loaded:
            yield base, loaded.pop(a), loaded.pop(b)


def export_peft(
    adapters: str | os.PathLike,
    output: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    progress: bool = True,
) -> Path:
    """Write a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) with
    Hugging Face module names, loadable by ``peft.PeftModel.from_pretrained`` on the HF export of
    the base model.

    Args:
        adapters: a checkpoint saved with the LoRA callback (adapter-only or full).
        output: the directory to create.
        base_model_name_or_path: recorded in adapter_config.json; default: the checkpoint's HF source.
    """
    adapters, output = Path(adapters), Path(output)
    info, config = _adapter_info(adapters)
    lora, table = info["lora"], family_table(config.family)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new output directory")
    output.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for base, a_stacked, b_stacked in _lora_pairs(adapters, table, progress):
        if ".experts." in base:
            raise ValueError(
                "LoRA on MoE expert linears has no PEFT form here (transformers fuses the experts); export "
                "the adapters merged into the model instead (merge_lora_to_hf / --merge-lora)"
            )
        transform, names = table[base]
        for index, a in _unstack(base, a_stacked):
            b = b_stacked[tuple(index.values())]
            for name, b_part in zip(names, from_megatron(transform, b, config), strict=True):
                module = name.format(**index).removesuffix(".weight")
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.clone()  # shared by the parts: one copy each
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_part.contiguous()
                targets.add(module.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError(f"{adapters} has no LoRA tensors for the {config.family} linears")
    saved = _saved_keys(table, lora)
    for key, tensor in _stacked_tensors(adapters, [k for k in saved if not _tied_output(k, config)], progress):
        transform, names = table[key]
        for index, piece in _unstack(key, tensor):
            for name, hf in zip(names, from_megatron(transform, piece, config), strict=True):
                tensors[PEFT_PREFIX + name.format(**index)] = hf.contiguous()
    to_save = sorted({name.split(".")[-2] for key in saved for name in table[key][1]})
    from safetensors.torch import save_file

    save_file(tensors, output / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or info.get("hf_source"),
        "r": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "use_rslora": lora["use_rslora"],
        "target_modules": sorted(targets),
        "modules_to_save": to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (output / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return output


def merge_lora_to_hf(
    adapters: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 << 30,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face model with the adapters folded into the base weights.

    Args:
        adapters: a checkpoint saved with the LoRA callback.
        output: the HF directory to create.
        base: the base weights: a torch_dist checkpoint or a Hugging Face directory; default: the
            adapters' own checkpoint when it holds the base too, else the LoRA callback's
            ``base_load`` or the HF model the run started from.
    """
    from lightning_megatron.hf.convert import export_hf

    adapters, output = Path(adapters), Path(output)
    info, config = _adapter_info(adapters)
    if base is None:
        base = adapters if not info.get("partial_model") else info["lora"].get("base_load") or info.get("hf_source")
    if base is None:
        raise ValueError(f"{adapters} holds adapters only and records no base model; pass base=<checkpoint or HF dir>")
    base = Path(base)
    if (base / "config.json").exists():
        return _merge_into_hf_dir(adapters, info, config, base, output, dtype, max_shard_size, progress)
    return export_hf(base, output, dtype=dtype, max_shard_size=max_shard_size, progress=progress, adapters=adapters)


def lora_updates(adapters: Path, progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``base key -> (A, B, scale)`` stacked, plus ``key -> tensor`` of saved modules_to_save
    (as ``(tensor, None, 0)``): what a merge changes in the base checkpoint."""
    info, config = _adapter_info(adapters)
    table, lora = family_table(config.family), info["lora"]
    updates = {base: (a, b, _scale(lora)) for base, a, b in _lora_pairs(adapters, table, progress)}
    saved = _saved_keys(table, lora)
    for key, tensor in _stacked_tensors(adapters, saved, progress):
        updates[key] = (tensor, None, 0.0)
    return updates


def apply_update(tensor: torch.Tensor, update: tuple[torch.Tensor, torch.Tensor | None, float]):
    """The merged stacked Megatron tensor: ``W + scale * B @ A`` (or the saved replacement)."""
    if update[1] is None:
        return update[0].to(tensor.dtype)
    return (tensor.float() + _scaled_product(update)).to(tensor.dtype)


def _merge_into_hf_dir(adapters, info, config, base, output, dtype, max_shard_size, progress) -> Path:
    table = family_table(config.family)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new output directory")
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The Megatron-space update of each layer, split into the HF parts like the base weight.
    deltas: dict[str, tuple[torch.Tensor, bool]] = {}
    for key, update in lora_updates(adapters, progress).items():
        transform, names = table[key]
        stacked = update[0] if update[1] is None else _scaled_product(update)
        for index, piece in _unstack(key, stacked):
            for name, hf in zip(names, from_megatron(transform, piece, config), strict=True):
                deltas[name.format(**index)] = (hf, update[1] is None)
    reader, writer = SafetensorsReader(base), ShardWriter(output, max_shard_size)
    written_dtype = dtype
    for name in reader.files:
        tensor = reader.get(name)
        written_dtype = written_dtype or tensor.dtype
        if name in deltas:
            delta, replaces = deltas.pop(name)
            tensor = delta.to(tensor.dtype) if replaces else (tensor.float() + delta.float()).to(tensor.dtype)
        writer.add(name, tensor.to(written_dtype))
    if deltas:
        raise KeyError(f"the base model {base} has no tensors {sorted(deltas)[:5]}...: is it the adapters' base?")
    writer.close()
    _write_config(output, config, base, written_dtype or torch.bfloat16)
    if progress:
        print(f"merged {adapters} into {base} -> {output} in {time.perf_counter() - start:.1f}s", flush=True)
    return output


def _scaled_product(update: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    a, b, scale = update
    return scale * (b.float() @ a.float())
