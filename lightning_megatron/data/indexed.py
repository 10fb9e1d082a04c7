"""Megatron's indexed datasets (``.bin``/``.idx``): write them from text, read them as blocks.

The files are Megatron-Core's own format (``IndexedDatasetBuilder`` / ``IndexedDataset``), so
data preprocessed here also serves Megatron-LM and NeMo, and theirs serves us.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def preprocess(documents: Iterable[str], output_prefix: str | Path, tokenizer: Any, progress: bool = True) -> Path:
    """Tokenize documents (each followed by the end-of-sequence token) into ``PREFIX.bin/.idx``,
    with a progress bar (documents and tokens so far) unless ``progress=False``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm.auto import tqdm

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    dtype = np.uint16 if vocab < 65500 else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    bar = tqdm(documents, desc=f"tokenizing -> {prefix}.bin", unit=" docs", disable=not progress, mininterval=1)
    tokens = 0
    for document in bar:
        ids = list(tokenizer.encode(document)) + [tokenizer.eos_token_id]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
        tokens += len(ids)
        bar.set_postfix(tokens=tokens, refresh=False)
    builder.finalize(f"{prefix}.idx")
    return prefix


class IndexedBlocks(Dataset):
    """Non-overlapping ``seq_length``-token rows over the documents of an indexed dataset, read
    from the memory-mapped ``.bin`` on demand (nothing is loaded up front)."""

    def __init__(self, prefix: str | Path, seq_length: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        prefix = str(prefix).removesuffix(".bin").removesuffix(".idx")
        if not (Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()):
            raise FileNotFoundError(f"no {prefix}.bin/.idx; make them with `lightning-megatron preprocess`")
        self.data = IndexedDataset(prefix)
        self.seq_length = seq_length
        self.starts = np.concatenate([[0], np.cumsum(self.data.sequence_lengths)]).tolist()
        self.rows = self.starts[-1] // seq_length
        if self.rows == 0:
            raise ValueError(f"{prefix} holds {self.starts[-1]} tokens: no row of seq_length={seq_length}")

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        begin, end = index * self.seq_length, (index + 1) * self.seq_length
        pieces, position = [], begin
        while position < end:
            doc = bisect.bisect_right(self.starts, position) - 1
            offset = position - self.starts[doc]
            length = min(end, self.starts[doc + 1]) - position
            pieces.append(self.data.get(doc, offset, length))
            position += length
        row = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        return {"input_ids": row, "labels": row}
