"""``PretrainDataModule``: text, JSONL or parquet files (or a ``datasets`` dataset) -> packed blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_megatron.data.sft import DataFormatError
from lightning_megatron.data.text import TokenBlocks


def read_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` (blank-line separated), ``.jsonl`` or ``.parquet`` file."""
    path = Path(source)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import datasets

        yield from datasets.load_dataset("parquet", data_files=str(path), split="train")[text_field]
    elif path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from error
            if text_field not in row:
                raise DataFormatError(f"{path}:{number}: no {text_field!r} field (keys {sorted(row)})")
            yield row[text_field]
    else:
        yield from (doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip())


class PretrainDataModule(L.LightningDataModule):
    """Documents tokenized, joined with the end-of-sequence token and cut into ``seq_length`` rows.

    Args:
        sources: file paths (``.txt``, ``.jsonl`` with ``text_field``, ``.parquet``), Megatron
            indexed datasets (``PREFIX.bin``; see ``lightning-megatron preprocess``), or one
            ``datasets.Dataset`` with a ``text_field`` column.
        tokenizer: anything with ``encode`` and ``eos_token_id`` (transformers tokenizers included).
        split_dataset_ratio: fraction of rows held out for validation (deterministic for ``seed``).
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
    ) -> None:
        super().__init__()
        self.sources, self.tokenizer, self.seq_length = sources, tokenizer, seq_length
        self.batch_size, self.split_dataset_ratio, self.seed, self.text_field = (
            batch_size,
            split_dataset_ratio,
            seed,
            text_field,
        )
        self.train: TokenBlocks | None = None
        self.val: torch.utils.data.Subset | None = None

    def _documents(self) -> Iterator[str]:
        if hasattr(self.sources, "column_names"):  # a datasets.Dataset
            yield from self.sources[self.text_field]
            return
        for source in self.sources:
            yield from read_documents(source, self.text_field)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        is_dataset = hasattr(self.sources, "column_names")
        indexed = [] if is_dataset else [Path(s).suffix in (".bin", ".idx") for s in self.sources]
        if any(indexed):
            if not all(indexed):
                raise ValueError("mix indexed (.bin/.idx) and raw sources in separate data modules")
            from lightning_megatron.data.indexed import IndexedBlocks

            blocks = torch.utils.data.ConcatDataset([IndexedBlocks(s, self.seq_length) for s in self.sources])
        else:
            tokens: list[int] = []
            for document in self._documents():
                tokens.extend(self.tokenizer.encode(document))
                tokens.append(self.tokenizer.eos_token_id)
            blocks = TokenBlocks(tokens, self.seq_length)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held_out = int(round(len(blocks) * self.split_dataset_ratio))
        self.val = torch.utils.data.Subset(blocks, order[:held_out])
        self.train = torch.utils.data.Subset(blocks, order[held_out:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)
