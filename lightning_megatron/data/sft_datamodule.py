"""``SFTDataModule``: chat/instruction files -> tokenized, optionally packed, training batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_megatron.data.sft import (
    DataFormatError,
    LossOn,
    RowTooLongError,
    Stats,
    Truncation,
    pack,
    render,
    sample_sources,
    to_messages,
    truncate,
    use_template,
)


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` pairs from a ``.jsonl`` or ``.json`` file; ``where`` is ``file:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: cannot read ({error})") from error
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from error
    return out


SELF_COGNITION = "self-cognition"


def self_cognition(name: str, author: str) -> list[tuple[str, dict[str, Any]]]:
    """The bundled self-cognition rows with ``{{NAME}}``/``{{AUTHOR}}`` filled in."""
    from importlib import resources

    text = resources.files("lightning_megatron.data").joinpath("self_cognition.jsonl").read_text(encoding="utf-8")
    text = text.replace("{{NAME}}", name).replace("{{AUTHOR}}", author)
    return [(f"{SELF_COGNITION}:{i}", json.loads(line)) for i, line in enumerate(text.splitlines(), 1)]


def parse_source(source: str) -> tuple[str, int | None]:
    """``"data.jsonl#500"`` -> ``("data.jsonl", 500)`` (Megatron-SWIFT's sampling syntax)."""
    path, _, count = source.partition("#")
    if count and not count.isdigit():
        raise ValueError(f"{source!r}: the part after '#' must be a sample count, e.g. data.jsonl#500")
    return path, int(count) if count else None


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data for :class:`~lightning_megatron.GPTModule`.

    Args:
        sources: files (``.jsonl``/``.json``), each optionally ``path#N`` to take N samples.
        tokenizer: a transformers tokenizer; its chat template renders the rows.
        max_length: tokens per sample (and per packed row).
        template: ``"chatml"``/``"llama3"`` or a Jinja string, for tokenizers without a template.
        loss_on: ``"assistant"`` (default), ``"all"`` tokens or the ``"last"`` assistant turn.
        truncation: rows over ``max_length``: ``"error"``, ``"drop"``, ``"truncate_left"``/``"right"``.
        packing: several samples per row, attention isolated between them.
        split_dataset_ratio: fraction held out for validation (deterministic for ``seed``).
        lenient: skip rows that match no format (counted and listed) instead of raising.
        model_name, model_author: fill the bundled ``"self-cognition"`` source (use it like a
            file: ``sources=["self-cognition#200", "my_data.jsonl"]``).
        streaming: read and tokenize the (``.jsonl``) training files lazily, sharded by
            data-parallel rank (:class:`~lightning_megatron.data.streaming.StreamingRows`); no
            ``#N`` sampling, packing or split then (validation comes from ``val_sources``).
        val_sources: validation files used as they are (with or without streaming).
    """

    def __init__(
        self,
        sources: Sequence[str],
        tokenizer: Any,
        max_length: int = 2048,
        template: str | None = None,
        loss_on: LossOn = "assistant",
        truncation: Truncation = "error",
        packing: bool = False,
        split_dataset_ratio: float = 0.0,
        batch_size: int = 8,
        seed: int = 42,
        lenient: bool = False,
        pad_to_multiple_of: int = 8,
        model_name: str | None = None,
        model_author: str | None = None,
        streaming: bool = False,
        val_sources: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.sources, self.tokenizer, self.max_length = list(sources), tokenizer, max_length
        self.template, self.loss_on, self.truncation, self.packing = template, loss_on, truncation, packing
        self.split_dataset_ratio, self.batch_size = split_dataset_ratio, batch_size
        self.seed, self.lenient = seed, lenient
        self.pad_to_multiple_of = pad_to_multiple_of
        self.model_name, self.model_author = model_name, model_author
        self.streaming, self.val_sources = streaming, list(val_sources)
        if streaming and (packing or split_dataset_ratio or any("#" in src for src in self.sources)):
            raise ValueError("streaming=True reads files as they are: no packing, split_dataset_ratio or '#N'")
        self.stats = Stats()
        self.train: Any = []  # samples, packed rows, or a StreamingRows dataset
        self._prepared = False
        self.val: list[dict[str, torch.Tensor]] = []

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:  # Lightning calls setup for every stage
            return
        self._prepared = True
        use_template(self.tokenizer, self.template)
        if self.val_sources:
            self.val = self._rows_to_samples([r for src in self.val_sources for r in read_rows(src)], self.packing)
        if self.streaming:
            from lightning_megatron.data.streaming import StreamingRows

            self.train = StreamingRows(self.sources, self._stream_sample)
            return
        loaded = []
        for source in self.sources:
            path, count = parse_source(source)
            if path == SELF_COGNITION:
                if not (self.model_name and self.model_author):
                    raise ValueError("the self-cognition source needs model_name=... and model_author=...")
                loaded.append((path, self_cognition(self.model_name, self.model_author), count))
            else:
                loaded.append((path, read_rows(path), count))
        rows = sample_sources(loaded, self.seed)
        held_out = int(round(len(rows) * self.split_dataset_ratio))
        val_rows, train_rows = rows[:held_out], rows[held_out:]
        self.train = self._rows_to_samples(train_rows, pack_rows=self.packing)
        self.val = self.val or self._rows_to_samples(val_rows, pack_rows=self.packing)
        s = self.stats
        rank_zero_info(
            f"SFT data: {s.rows} rows, {s.kept} kept, {s.truncated} truncated, "
            f"{s.dropped_too_long} dropped (too long), {len(s.skipped_bad)} skipped (bad); "
            f"{len(self.train)} train / {len(self.val)} val {'packed rows' if self.packing else 'samples'}"
        )

    def _rows_to_samples(self, rows: list[tuple[str, dict[str, Any]]], pack_rows: bool) -> list[dict[str, Any]]:
        samples = [sample for where, row in rows if (sample := self._checked_sample(where, row)) is not None]
        if pack_rows:
            pad = self.tokenizer.pad_token_id or 0
            return pack([(s["input_ids"], s["labels"]) for s in samples], self.max_length, pad)
        return [_tensors(sample) for sample in samples]

    def _stream_sample(self, where: str, row: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        sample = self._checked_sample(where, row)
        return None if sample is None else _tensors(sample)

    def _checked_sample(self, where: str, row: dict[str, Any]) -> dict[str, list[int]] | None:
        """One row through :meth:`_sample`, counted; bad rows raise, or are listed when lenient."""
        self.stats.rows += 1
        try:
            sample = self._sample(where, row)
        except RowTooLongError:
            raise
        except DataFormatError as error:
            if not self.lenient:
                raise
            self.stats.skipped_bad.append(str(error))
            return None
        if sample is not None:
            self.stats.kept += 1
        return sample

    def _sample(self, where: str, row: dict[str, Any]) -> dict[str, list[int]] | None:
        """Token ids and labels of one row; ``None`` when dropped as too long."""
        ids, labels = render(to_messages(row, where), self.tokenizer, self.loss_on)
        kept = truncate(ids, labels, self.max_length, self.truncation, where, self.stats)
        return None if kept is None else {"input_ids": kept[0], "labels": kept[1]}

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad every sequence of the batch to the longest (rounded up to ``pad_to_multiple_of``,
        for SP/CP). Each ``*input_ids`` gets its ``*attention_mask`` unless the row is packed."""
        longest = max(value.shape[0] for row in rows for value in row.values())
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id or 0
        batch: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            for key, value in row.items():
                extra = length - value.shape[0]
                fill = pad if key.endswith("input_ids") else -100 if key.endswith("labels") else 0
                batch.setdefault(key, []).append(torch.cat([value, value.new_full((extra,), fill)]))
                if key.endswith("input_ids") and "segment_ids" not in row:
                    mask = torch.cat(
                        [torch.ones(value.shape[0], dtype=torch.long), torch.zeros(extra, dtype=torch.long)]
                    )
                    batch.setdefault(key.removesuffix("input_ids") + "attention_mask", []).append(mask)
        return {key: torch.stack(values) for key, values in batch.items()}

    def train_dataloader(self) -> DataLoader:
        if self.streaming:  # the files' order; the dataset shards itself over ranks and workers
            return DataLoader(self.train, batch_size=self.batch_size, drop_last=True, collate_fn=self.collate)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=self.collate,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)


class PreferenceDataModule(SFTDataModule):
    """Preference pairs (``chosen``/``rejected``, see :func:`~lightning_megatron.data.sft.to_preference`)
    for DPO: each batch holds ``chosen_*`` and ``rejected_*`` ids and labels padded to one length.
    Rows over ``max_length`` follow ``truncation`` (either side too long counts once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.packing:
            raise ValueError("packing=True is not supported for preference pairs; use packing=False")

    def _sample(self, where: str, row: dict[str, Any]) -> dict[str, list[int]] | None:
        from lightning_megatron.data.sft import render_preference

        pair = render_preference(row, self.tokenizer, where)
        sides = Stats()  # a pair counts once, however many of its sides were cut
        for side in ("chosen", "rejected"):
            ids, labels = f"{side}_input_ids", f"{side}_labels"
            cut = truncate(pair[ids], pair[labels], self.max_length, self.truncation, where, sides)
            if cut is None:
                self.stats.dropped_too_long += 1
                return None
            pair[ids], pair[labels] = cut
        self.stats.truncated += bool(sides.truncated)
        return pair


def _tensors(sample: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(values) for key, values in sample.items()}


__all__ = ["PreferenceDataModule", "SFTDataModule", "parse_source", "read_rows"]
