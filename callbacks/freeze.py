"""Freeze: train only part of the model (Megatron-SWIFT's freeze_parameters* options)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class Freeze(L.Callback):
    """Freeze parameters before Megatron wraps the model, so frozen ones get no gradient buffer
    and no optimizer state.

    Names are Megatron's, with global layer numbers whatever the pipeline layout, e.g.
    ``embedding.word_embeddings.weight``, ``decoder.layers.3.mlp.linear_fc1.weight``,
    ``decoder.final_layernorm.weight``, ``output_layer.weight``.

    Args:
        parameters: name prefixes to freeze (``["embedding", "decoder.layers.0."]``).
        regex: freeze names matching this regular expression.
        freeze_ratio: freeze the embedding and this fraction of the layers, from the bottom.
        trainable_parameters, trainable_regex: exceptions that stay trainable.

    Example::

        Trainer(strategy=MegatronStrategy(tp=2), callbacks=[Freeze(freeze_ratio=0.5)])
    """

    def __init__(
        self,
        parameters: Sequence[str] = (),
        regex: str | None = None,
        freeze_ratio: float = 0.0,
        trainable_parameters: Sequence[str] = (),
        trainable_regex: str | None = None,
    ) -> None:
        if not 0.0 <= freeze_ratio <= 1.0:
            raise ValueError(f"freeze_ratio={freeze_ratio} must be between 0 and 1")
        self.parameters, self.freeze_ratio = tuple(parameters), freeze_ratio
        self.regex = re.compile(regex) if regex else None
        self.trainable_parameters = tuple(trainable_parameters)
        self.trainable_regex = re.compile(trainable_regex) if trainable_regex else None

    def frozen(self, name: str, num_layers: int) -> bool:
        if self.trainable_parameters and name.startswith(self.trainable_parameters):
            return False
        if self.trainable_regex and self.trainable_regex.search(name):
            return False
        if self.parameters and name.startswith(self.parameters):
            return True
        if self.regex and self.regex.search(name):
            return True
        if self.freeze_ratio:
            bottom = int(self.freeze_ratio * num_layers)
            layer = re.match(r"decoder\.layers\.(\d+)\.", name)
            return name.startswith("embedding.") or (layer is not None and int(layer.group(1)) < bottom)
        return False

    def configure_megatron_model(
        self, trainer: L.Trainer, module: L.LightningModule, chunks: Sequence[torch.nn.Module]
    ) -> None:
        """Called by MegatronStrategy after ``configure_model``, before the Megatron wrappers."""
        num_layers = chunks[0].config.num_layers
        trainable = total = 0
        for name, param in _global_names(chunks):
            if self.frozen(name, num_layers):
                param.requires_grad_(False)
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        if not trainable:
            raise ValueError("Freeze left no trainable parameter on this rank; add trainable_parameters")
        rank_zero_info(
            f"Freeze: {trainable:,} of {total:,} parameters trainable on rank 0 ({100 * trainable / total:.1f}%)"
        )


def _global_names(chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters with ``decoder.layers.<global layer index>`` names (pipeline offsets applied)."""
    for chunk in chunks:
        offsets = {}
        decoder = getattr(chunk, "decoder", None)
        for local, layer in enumerate(getattr(decoder, "layers", [])):
            offsets[str(local)] = str(layer.layer_number - 1)
        for name, param in chunk.named_parameters():
            match = re.match(r"decoder\.layers\.(\d+)\.", name)
            if match:
                name = f"decoder.layers.{offsets[match.group(1)]}.{name[match.end() :]}"
            yield name, param
