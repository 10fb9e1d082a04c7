"""``SFTDataModule``: chat/instruction files -> tokenized, optionally packed, training batches."""

from __future__ import annotations

import dataclasses
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
    RowRenderer,
    Stats,
    Truncation,
    pack,
    sample_sources,
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
        if not isinstance(rows, list):
            raise DataFormatError(f"{path}: a .json file must hold a list of rows, not a {type(rows).__name__}")
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
        padding_free: each DataLoader batch becomes one row, its samples end to end with
            attention isolated between them (no padding but the round-up to
            ``pad_to_multiple_of``; THD with Transformer Engine). A batch is then one microbatch:
            use ``MegatronStrategy(micro_batch_size=1)``.
        split_dataset_ratio: fraction held out for validation (deterministic for ``seed``).
        lenient: skip rows that match no format (counted and listed) instead of raising.
        model_name, model_author: fill the bundled ``"self-cognition"`` source (use it like a
            file: ``sources=["self-cognition#200", "my_data.jsonl"]``).
        streaming: read and tokenize the (``.jsonl``) training files lazily, sharded by
            data-parallel rank (:class:`~lightning_megatron.data.streaming.StreamingRows`); no
            ``#N`` sampling, packing or split then (validation comes from ``val_sources``).
        val_sources: validation files used as they are (with or without streaming).
        lazy_tokenize: keep the training rows as read and tokenize each when the DataLoader asks
            for it (in its workers): no tokenizing pass up front, with ``#N``, splits and
            shuffling as usual; no packing (it needs every length first). A row dropped as too long
            (or skipped as bad under ``lenient``) becomes a sample with no loss.
        num_workers: the training DataLoader's worker processes (they tokenize with
            ``streaming`` or ``lazy_tokenize``).
        num_proc: processes tokenizing the rows up front (with ``streaming`` or
            ``lazy_tokenize`` the DataLoader's ``num_workers`` tokenize the training rows).
        cache_dir: keep the tokenized rows here, keyed by the files (path, size, modification
            time), the tokenizer and chat template, and every option that changes the rows; a
            second run with the same key reads them instead of tokenizing. ``None``: no cache.
    """

    preference = False  # rows are chosen/rejected pairs (PreferenceDataModule)

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
        lazy_tokenize: bool = False,
        num_workers: int = 0,
        num_proc: int = 1,
        padding_free: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.sources, self.tokenizer, self.max_length = list(sources), tokenizer, max_length
        self.template, self.loss_on, self.truncation, self.packing = template, loss_on, truncation, packing
        self.split_dataset_ratio, self.batch_size = split_dataset_ratio, batch_size
        self.seed, self.lenient = seed, lenient
        self.pad_to_multiple_of = pad_to_multiple_of
        self.model_name, self.model_author = model_name, model_author
        self.streaming, self.val_sources = streaming, list(val_sources)
        self.num_proc, self.cache_dir, self.lazy_tokenize = num_proc, cache_dir, lazy_tokenize
        self.num_workers, self.padding_free = num_workers, padding_free
        if padding_free and packing:
            raise ValueError("padding_free=True packs each batch itself; use it or packing=True, not both")
        if streaming and (packing or split_dataset_ratio or any("#" in src for src in self.sources)):
            raise ValueError("streaming=True reads files as they are: no packing, split_dataset_ratio or '#N'")
        if (streaming or lazy_tokenize) and cache_dir is not None:
            raise ValueError("streaming and lazy_tokenize tokenize on the fly, nothing to cache: drop cache_dir")
        if lazy_tokenize and (packing or streaming):
            raise ValueError("lazy_tokenize=True cannot pack (packing needs every length first) or stream")
        self.stats = Stats()
        self.train: Any = []  # samples, packed rows, or a StreamingRows / LazyRows dataset
        self._prepared = False
        self.val: list[dict[str, torch.Tensor]] = []

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:  # Lightning calls setup for every stage
            return
        self._prepared = True
        use_template(self.tokenizer, self.template)
        if self.streaming:
            from lightning_megatron.data.streaming import StreamingRows

            if self.val_sources:
                self.val = self._finish(self._samples(self._val_source_rows()))
            self.train = StreamingRows(self.sources, _OnTheFly(self._renderer(), self.stats), filler=self._filler())
            return
        if self.lazy_tokenize:
            from lightning_megatron.data.streaming import LazyRows

            train_rows, val_rows = self._read()
            self.train = LazyRows(train_rows, _OnTheFly(self._renderer(), self.stats), filler=self._filler())
            self.val = self._finish(self._samples(val_rows))
            return
        cached = self._cached()
        if cached is None:
            train_rows, val_rows = self._read()
            train, val = self._samples(train_rows), self._samples(val_rows)
            if self.cache_dir is not None:
                from lightning_megatron.data import sft_cache

                sft_cache.save(self.cache_dir, self._cache_key(), dataclasses.asdict(self.stats), train=train, val=val)
        else:
            train, val = cached
        self.train, self.val = self._finish(train), self._finish(val)
        s = self.stats
        rank_zero_info(
            f"SFT data{' (from the cache)' if cached is not None else ''}: {s.rows} rows, {s.kept} kept, "
            f"{s.truncated} truncated, {s.dropped_too_long} dropped (too long), {len(s.skipped_bad)} skipped (bad); "
            f"{len(self.train)} train / {len(self.val)} val {'packed rows' if self.packing else 'samples'}"
        )

    def _read(self) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
        """Read, sample and split the sources: ``(train rows, validation rows)``."""
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
        if self.val_sources:
            val_rows = self._val_source_rows()
        return train_rows, val_rows

    def _val_source_rows(self) -> list[tuple[str, dict[str, Any]]]:
        """The rows of ``val_sources``, as they are (no sampling, split or streaming)."""
        return [row for source in self.val_sources for row in read_rows(source)]

    def _renderer(self) -> RowRenderer:
        return RowRenderer(
            self.tokenizer, self.max_length, self.loss_on, self.truncation, self.lenient, preference=self.preference
        )

    def _samples(self, rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, list[int]]]:
        """Rows tokenized (in ``num_proc`` processes), in order; counted in :attr:`stats`."""
        from lightning_megatron.data.parallel_map import parallel_map

        samples = []
        for sample, stats in parallel_map(self._renderer(), rows, self.num_proc):
            self.stats.add(stats)
            if sample is not None:
                samples.append(sample)
        return samples

    def _finish(self, samples: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
        if self.packing:
            pad = self.tokenizer.pad_token_id or 0
            return pack([(s["input_ids"], s["labels"]) for s in samples], self.max_length, pad)
        return [_tensors(sample) for sample in samples]

    def _filler(self) -> dict[str, torch.Tensor]:
        """The sample that stands in for a row skipped on the fly (and, streaming, for a shard's
        missing last row), so every data-parallel rank runs the same number of steps: one padding
        token and no label (a preference pair with no label tokens must carry no loss either)."""
        pad = self.tokenizer.pad_token_id or 0
        sides = ("chosen_", "rejected_") if self.preference else ("",)
        return {
            key: torch.tensor([value])
            for side in sides
            for key, value in ((f"{side}input_ids", pad), (f"{side}labels", -100))
        }

    def _cache_key(self) -> str:
        from lightning_megatron.data import sft_cache

        files = [parse_source(src)[0] for src in self.sources] + list(self.val_sources)
        return sft_cache.cache_key(
            kind="preference" if self.preference else "sft",
            sources=self.sources,
            val_sources=self.val_sources,
            files=[sft_cache.file_fingerprint(f) for f in files if f != SELF_COGNITION],
            tokenizer=sft_cache.tokenizer_fingerprint(self.tokenizer),
            options=[self.max_length, self.loss_on, self.truncation, self.lenient, self.seed, self.split_dataset_ratio],
            self_cognition=[self.model_name, self.model_author] if SELF_COGNITION in files else None,
        )

    def _cached(self) -> tuple[list, list] | None:
        if self.cache_dir is None:
            return None
        from lightning_megatron.data import sft_cache

        stored = sft_cache.load(self.cache_dir, self._cache_key())
        if stored is None:
            return None
        self.stats = Stats(**stored["stats"])
        return stored["train"], stored["val"]

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad every sequence of the batch to the longest (rounded up to ``pad_to_multiple_of``,
        for SP/CP). Each ``*input_ids`` gets its ``*attention_mask`` unless the row is packed.
        With ``padding_free`` the batch's samples become one packed row instead."""
        if self.padding_free:
            total = sum(row["input_ids"].shape[0] for row in rows)
            length = -(-total // self.pad_to_multiple_of) * self.pad_to_multiple_of
            samples = [(row["input_ids"].tolist(), row["labels"].tolist()) for row in rows]
            (joined,) = pack(samples, length, self.tokenizer.pad_token_id or 0)
            return {key: value[None] for key, value in joined.items()}
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
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if self.streaming:  # the files' order; the dataset shards itself over ranks and workers
            return DataLoader(
                self.train, batch_size=self.batch_size, drop_last=True, collate_fn=self.collate, **workers
            )
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=self.collate,
            generator=generator,
            **workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)


class PreferenceDataModule(SFTDataModule):
    """Preference pairs (``chosen``/``rejected``, see :func:`~lightning_megatron.data.sft.to_preference`)
    for DPO: each batch holds ``chosen_*`` and ``rejected_*`` ids and labels padded to one length.
    Rows over ``max_length`` follow ``truncation`` (either side too long counts once)."""

    preference = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.packing or self.padding_free:
            raise ValueError("packing and padding_free are not supported for preference pairs; leave them False")


class _OnTheFly:
    """Tokenize one row when the DataLoader asks for it. Picklable (DataLoader workers may be
    spawned); rows rendered in this process are counted in ``stats``, a worker counts its own."""

    def __init__(self, renderer: RowRenderer, stats: Stats) -> None:
        self.renderer, self.stats = renderer, stats

    def __call__(self, where: str, row: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        sample, stats = self.renderer((where, row))
        self.stats.add(stats)
        return None if sample is None else _tensors(sample)


def _tensors(sample: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(values) for key, values in sample.items()}


__all__ = ["PreferenceDataModule", "SFTDataModule", "parse_source", "read_rows"]
