"""``PretrainDataModule``: text, JSONL or parquet files (or a ``datasets`` dataset) -> packed blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_megatron.data.sft import DataFormatError
from lightning_megatron.data.text import TokenBlocks


def read_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` (blank-line separated), ``.jsonl`` or ``.parquet`` file."""
    path = Path(source)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if text_field not in table.column_names:
            raise DataFormatError(f"{path}: no {text_field!r} column (columns {table.column_names}); set text_field")
        yield from table[text_field]
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: cannot read ({error})") from error
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from error
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataFormatError(f"{path}:{number}: no {text_field!r} field ({keys})")
            if not isinstance(row[text_field], str):
                raise DataFormatError(
                    f"{path}:{number}: {text_field!r} is a {type(row[text_field]).__name__}, not text"
                )
            yield row[text_field]
    else:
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())


class PretrainDataModule(L.LightningDataModule):
    """Documents tokenized, joined with the end-of-sequence token and cut into ``seq_length`` rows.

    Args:
        sources: file paths (``.txt``, ``.jsonl`` with ``text_field``, ``.parquet``), one
            ``datasets.Dataset`` with a ``text_field`` column, or Megatron indexed datasets (made
            by ``lightning-megatron preprocess``) as Megatron's ``--data-path`` list: prefixes
            (``["out/a", "out/b.bin"]``) or weight/prefix pairs (``["0.7", "out/a", "0.3", "out/b"]``).
            Indexed data is read through Megatron-Core's ``BlendedMegatronDatasetBuilder``.
        tokenizer: anything with ``encode`` and ``eos_token_id`` (transformers tokenizers included).
        split_dataset_ratio: fraction of rows held out for validation (deterministic for ``seed``).
        num_proc: processes tokenizing raw files.
        split: indexed data only: Megatron's split string (``"949,50,1"``); default from
            ``split_dataset_ratio``.
        train_samples, val_samples: indexed data only: rows to draw per split (a weighted blend
            needs them). Default: ``Trainer.max_steps`` x global batch for training (one pass
            without ``max_steps``), and the split's proportion of that for validation.
        path_to_cache: indexed data only: where Megatron caches its index files.
        document_mask: indexed data only: attention, positions and loss stay within each document.
    """

    def __init__(
        self,
        sources: Sequence[str | Path] | Any,
        tokenizer: Any,
        seq_length: int = 2048,
        batch_size: int = 8,
        split_dataset_ratio: float = 0.0,
        seed: int = 42,
        text_field: str = "text",
        num_proc: int = 1,
        split: str | None = None,
        train_samples: int | None = None,
        val_samples: int | None = None,
        path_to_cache: str | Path | None = None,
        document_mask: bool = False,
    ) -> None:
        super().__init__()
        self.sources, self.tokenizer, self.seq_length = sources, tokenizer, seq_length
        self.batch_size, self.split_dataset_ratio, self.seed = batch_size, split_dataset_ratio, seed
        self.text_field, self.num_proc = text_field, num_proc
        self.split, self.train_samples, self.val_samples = split, train_samples, val_samples
        self.path_to_cache, self.document_mask = path_to_cache, document_mask
        self.indexed = _is_indexed(sources)
        if not self.indexed and (split or train_samples or val_samples or path_to_cache or document_mask):
            raise ValueError(
                "split, train_samples, val_samples, path_to_cache and document_mask apply to Megatron indexed "
                "sources (.bin/.idx); for raw files use split_dataset_ratio"
            )
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.test: Dataset | None = None

    def _documents(self) -> Iterator[str]:
        if hasattr(self.sources, "column_names"):  # a datasets.Dataset
            yield from self.sources[self.text_field]
            return
        for source in self.sources:
            yield from read_documents(source, self.text_field)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.indexed:
            self._setup_indexed()
            return
        from lightning_megatron.data.indexed import _EncodeDocument
        from lightning_megatron.data.parallel_map import parallel_map

        tokens: list[int] = []
        for ids in parallel_map(_EncodeDocument(self.tokenizer), self._documents(), self.num_proc):
            tokens.extend(ids)
        blocks = TokenBlocks(tokens, self.seq_length)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held_out = int(round(len(blocks) * self.split_dataset_ratio))
        self.val = torch.utils.data.Subset(blocks, order[:held_out])
        self.train = torch.utils.data.Subset(blocks, order[held_out:])

    def _setup_indexed(self) -> None:
        from lightning_megatron.data.indexed import build_megatron_datasets, split_sizes
        from lightning_megatron.data.streaming import data_parallel_rank_and_size

        ratio = self.split_dataset_ratio
        split = self.split or f"{1 - ratio:g},{ratio:g},0"
        train = self.train_samples
        trainer = self.trainer
        if train is None and trainer is not None and trainer.max_steps > 0:
            train = trainer.max_steps * self.batch_size * data_parallel_rank_and_size()[1]
        sizes = split_sizes(split, train) if train is not None else [None, None, None]
        if self.val_samples is not None:
            sizes[1] = self.val_samples
        self.train, self.val, self.test = build_megatron_datasets(
            self.sources,
            self.seq_length,
            eod=self.tokenizer.eos_token_id,
            split=split,
            num_samples=sizes,
            seed=self.seed,
            path_to_cache=self.path_to_cache,
            document_mask=self.document_mask,
        )

    def train_dataloader(self) -> DataLoader:
        if self.indexed:
            # Megatron's dataset is shuffled already (by seed): deal its order over the data-parallel
            # ranks as it is (Lightning would reshuffle with a sampler of its own).
            from torch.utils.data import DistributedSampler

            from lightning_megatron.data.streaming import data_parallel_rank_and_size

            rank, world = data_parallel_rank_and_size()
            sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=False)
            return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val if self.val is not None else [], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test if self.test is not None else [], batch_size=self.batch_size)


def _is_indexed(sources: Any) -> bool:
    """Whether ``sources`` name Megatron indexed datasets (a ``--data-path`` list)."""
    from lightning_megatron.data.indexed import _is_number, indexed_prefix

    if hasattr(sources, "column_names"):
        return False
    items = [str(s) for s in sources]
    indexed = [_is_number(s) or s.endswith((".bin", ".idx")) or indexed_prefix(s) is not None for s in items]
    if any(indexed) and not all(indexed):
        raw = [s for s, i in zip(items, indexed, strict=True) if not i]
        raise ValueError(
            f"{raw} are not indexed datasets: mix indexed (.bin/.idx) and raw sources in separate data modules"
        )
    return bool(items) and all(indexed)
