"""Hugging Face safetensors <-> Megatron tensors, under any parallel layout.

Import: every rank walks its own chunks' sharded state dict (Megatron's description of which
slice of which global tensor each local parameter is), builds each global tensor it needs from
the HF tensors of that one layer/expert, and copies its slice in. A rank reads only the tensors of
its own layers and experts, one at a time, from lazily opened safetensors files.

Export: reads a torch_dist checkpoint key by key (each key is one weight stacked over layers;
Megatron's loader reshards whatever layout wrote it), turns it into HF tensors and writes
size-limited safetensors shards as it goes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_megatron.hf.families import FAMILIES, family_table
from lightning_megatron.models.config import GPTConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


# ------------------------------------------------------------------------------ transforms
def to_megatron(
    transform: str, tensors: Sequence[torch.Tensor], config: GPTConfig, shape: Sequence[int]
) -> torch.Tensor:
    """One global Megatron tensor (of one layer/expert) from its HF tensors."""
    if transform == "copy":
        return tensors[0]
    if transform == "vocab":
        full = tensors[0].new_zeros(tuple(shape))  # padded rows stay zero
        full[: tensors[0].shape[0]] = tensors[0]
        return full
    if transform == "cat":
        return torch.cat(list(tensors), dim=0)
    if transform == "qkv":
        groups = config.num_query_groups
        q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tensors[0].shape[1:])
    raise ValueError(f"unknown transform {transform!r}")


def from_megatron(transform: str, tensor: torch.Tensor, config: GPTConfig) -> list[torch.Tensor]:
    """The HF tensors of one layer/expert from a global Megatron tensor (inverse of to_megatron)."""
    if transform == "copy":
        return [tensor]
    if transform == "vocab":
        return [tensor[: config.vocab_size]]
    if transform == "cat":
        return list(torch.chunk(tensor, 2, dim=0))
    if transform == "qkv":
        groups, head_dim = config.num_query_groups, config.head_dim
        per_group = config.num_attention_heads // groups * head_dim
        grouped = tensor.reshape(groups, per_group + 2 * head_dim, *tensor.shape[1:])
        q, k, v = torch.split(grouped, [per_group, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *tensor.shape[1:]) for t in (q, k, v)]
    raise ValueError(f"unknown transform {transform!r}")


# ---------------------------------------------------------------------------------- import
class SafetensorsReader:
    """Tensors of a HF model directory by name, opening each safetensors file once, lazily."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").exists():
            with safe_open(self.directory / "model.safetensors", "pt") as f:
                self.files = {name: "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.directory}; "
                "pass a Hugging Face model directory saved with safetensors"
            )
        self._open: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{name} is not in the Hugging Face checkpoint {self.directory}")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.directory / file, "pt")
        return self._open[file].get_tensor(name)


def load_hf_weights(chunks: Sequence[torch.nn.Module], source: str | os.PathLike, config: GPTConfig) -> None:
    """Copy a HF model's weights into this rank's Megatron chunks (any TP/PP/EP layout)."""
    table = family_table(config.family)
    reader = SafetensorsReader(source)
    states = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)  # fused SwiGLU fc1 becomes its gate and up slices (views)
        # ShardedObjects (Transformer Engine's extra state) have nothing to import.
        states.extend(s for s in nested_values(state) if isinstance(s, ShardedTensor))
    show = _progress(len(states), f"importing {source}")
    for done, sharded in enumerate(states, 1):
        show(done)
        if sharded.key not in table:
            raise KeyError(f"no Hugging Face source for Megatron tensor {sharded.key} ({config.family})")
        transform, names = table[sharded.key]
        prepend = sharded.prepend_axis_num
        index = dict(zip(("layer", "expert"), sharded.global_offset[:prepend], strict=False))
        hf = [reader.get(name.format(**index)) for name in names]
        full = to_megatron(transform, hf, config, sharded.global_shape[prepend:])
        region = tuple(
            slice(o, o + n) for o, n in zip(sharded.global_offset[prepend:], sharded.local_shape, strict=True)
        )
        with torch.no_grad():
            sharded.data.copy_(full[region])


def _progress(total: int, what: str, every_seconds: float = 10.0):
    """A callable printing ``what: done/total`` on rank 0 at most every ``every_seconds``."""
    rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    last = [time.perf_counter()]

    def show(done: int) -> None:
        now = time.perf_counter()
        if rank_zero and (now - last[0] > every_seconds or (done == total and now - last[0] > 1)):
            print(f"{what}: {done}/{total} tensors", flush=True)
            last[0] = now

    return show


# ---------------------------------------------------------------------------------- export
def hf_config(config: GPTConfig, dtype: torch.dtype = torch.bfloat16):
    """The transformers config of a ``GPTConfig`` (for exports without an original HF directory)."""
    from transformers import AutoConfig

    if config.family not in FAMILIES:
        raise ValueError(f"no Hugging Face mapping for family {config.family!r}; supported: {sorted(FAMILIES)}")
    values: dict[str, Any] = dict(
        architectures=[FAMILIES[config.family][1]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.init_method_std,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.rope_scaling:
        values["rope_scaling"] = dict(config.rope_scaling)
    if config.family == "mixtral":
        values.update(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.moe_router_topk,
            intermediate_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
        )
    if config.family in ("qwen2_moe", "qwen3_moe"):
        values.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.moe_router_topk,
            moe_intermediate_size=config.moe_ffn_hidden_size,
            norm_topk_prob=not config.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if config.family == "qwen2_moe":
        values.update(shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size)
    return AutoConfig.for_model(config.family, **values)


class ShardWriter:
    """Writes tensors into safetensors files of at most ``max_shard_bytes`` as they arrive."""

    def __init__(self, output: Path, max_shard_bytes: int) -> None:
        self.output, self.max_shard_bytes = output, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.output / f"shard-{len(self.files)}.tmp", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.output / "shard-0.tmp", self.output / "model.safetensors")
            return
        weight_map, total = {}, len(self.files)
        for i, names in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.output / f"shard-{i}.tmp", self.output / name)
            weight_map.update({tensor: name for tensor in names})
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (self.output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    hf_source: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 << 30,
    progress: bool = True,
    adapters: str | os.PathLike | None = None,
) -> Path:
    """Write a Hugging Face model directory from a torch_dist checkpoint saved under any layout.

    Args:
        checkpoint: a checkpoint directory written by ``MegatronStrategy``.
        output: the HF directory to create (sharded safetensors, ``config.json``,
            ``generation_config.json``, tokenizer files).
        hf_source: the original HF directory, whose config, generation config and tokenizer files
            are copied; default: the one the model was imported from (recorded in the checkpoint),
            else a config built from the model's ``GPTConfig``.
        dtype: dtype of the written weights; default: the checkpoint's.
        max_shard_size: bytes per safetensors file.
        adapters: a checkpoint saved with the LoRA callback whose adapters are merged into the
            weights as they are written (see also :func:`~lightning_megatron.hf.merge_lora_to_hf`).
    """
    from lightning_megatron.checkpoint import CheckpointError, read_info
    from lightning_megatron.hf.adapters import apply_update, lora_updates

    checkpoint, output = Path(checkpoint), Path(output)
    info = read_info(checkpoint)
    if info.get("partial_model"):
        raise CheckpointError(
            f"{checkpoint} holds LoRA adapters only, not a whole model; export them with export_peft, or "
            "merged into their base with merge_lora_to_hf (CLI: export --to-hf --adapters ... --merge-lora)"
        )
    config = GPTConfig(**info["model_config"])
    table = family_table(config.family)
    hf_source = hf_source or info.get("hf_source")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new output directory")
    output.mkdir(parents=True, exist_ok=True)
    updates = lora_updates(Path(adapters), progress) if adapters is not None else {}
    writer = ShardWriter(output, max_shard_size)
    start, written_dtype = time.perf_counter(), dtype
    for key, tensor in _stacked_tensors(checkpoint, [k for k in table if not _tied_output(k, config)], progress):
        transform, names = table[key]
        if key in updates:
            tensor = apply_update(tensor, updates.pop(key))
        written_dtype = written_dtype or tensor.dtype
        for index, global_tensor in _unstack(key, tensor):
            for name, hf_tensor in zip(names, from_megatron(transform, global_tensor, config), strict=True):
                writer.add(name.format(**index), hf_tensor.to(written_dtype))
        del tensor
    writer.close()
    _write_config(output, config, hf_source, written_dtype or torch.bfloat16)
    if progress:
        print(f"exported {checkpoint} -> {output} in {time.perf_counter() - start:.1f}s", flush=True)
    return output


def _tied_output(key: str, config: GPTConfig) -> bool:
    return key == "output_layer.weight" and config.tie_word_embeddings


def _stacked_tensors(checkpoint: Path, keys: list[str], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Each checkpoint key as one global tensor (all layers), loaded one key at a time."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    from lightning_megatron.checkpoint import _check_pickled_metadata, _safe_globals

    with _single_process_group(), torch.serialization.safe_globals(_safe_globals()):
        _check_pickled_metadata(checkpoint / ".metadata")
        available = load_tensors_metadata(str(checkpoint))
        present = [key for key in keys if key in available]
        for i, key in enumerate(present):
            meta = available[key]
            template = {key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))}
            loaded = dist_checkpointing.load(template, str(checkpoint))
            if progress:
                print(f"[{i + 1}/{len(present)}] {key} {tuple(meta.global_shape)}", flush=True)
            yield key, loaded[key]


def _unstack(key: str, tensor: torch.Tensor) -> Iterator[tuple[dict[str, int], torch.Tensor]]:
    """Split a stacked checkpoint tensor into (layer[, expert]) pieces."""
    if key.startswith("decoder.layers.mlp.experts."):
        for layer in range(tensor.shape[0]):
            for expert in range(tensor.shape[1]):
                yield {"layer": layer, "expert": expert}, tensor[layer, expert]
    elif key.startswith("decoder.layers."):
        for layer in range(tensor.shape[0]):
            yield {"layer": layer}, tensor[layer]
    else:
        yield {}, tensor


def _write_config(output: Path, config: GPTConfig, hf_source: str | os.PathLike | None, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    source = Path(hf_source) if hf_source else None
    if source is not None and (source / "config.json").exists():
        shutil.copy(source / "config.json", output / "config.json")
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (source / name).exists():
                shutil.copy(source / name, output / name)
    else:
        hf = hf_config(config, dtype)
        hf.save_pretrained(output)
    if not (output / "generation_config.json").exists():
        from transformers import AutoConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(output)).save_pretrained(output)


class _single_process_group:
    """Megatron's checkpoint loader needs torch.distributed; start a 1-process gloo group if none."""

    def __enter__(self) -> None:
        self.started = not torch.distributed.is_initialized()
        if self.started:
            import tempfile

            store = torch.distributed.FileStore(tempfile.mktemp(prefix="lm-export-"), 1)
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            torch.distributed.destroy_process_group()
