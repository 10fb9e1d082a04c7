"""Megatron's indexed datasets (``.bin``/``.idx``): write them from text, read them through
Megatron-Core's own dataset builders.

The files are Megatron-Core's format (``IndexedDatasetBuilder`` / ``IndexedDataset``), so data
preprocessed here also serves Megatron-LM and NeMo, and theirs serves us. Reading goes through
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``: Megatron-style blends (``["0.7", "a", "0.3",
"b"]``), split strings (``"949,50,1"``), seeded document/sample shuffling and the cached index
files (``path_to_cache``) behave exactly as in Megatron-LM.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def preprocess(
    documents: Iterable[str], output_prefix: str | Path, tokenizer: Any, num_proc: int = 1, progress: bool = True
) -> Path:
    """Tokenize documents (each followed by the end-of-sequence token) into ``PREFIX.bin/.idx``,
    in ``num_proc`` processes (documents keep their order), with a progress bar (documents and
    tokens so far) unless ``progress=False``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm.auto import tqdm

    from lightning_megatron.data.parallel_map import parallel_map

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    dtype = np.uint16 if vocab < 65500 else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    encoded = parallel_map(_EncodeDocument(tokenizer), documents, num_proc)
    bar = tqdm(encoded, desc=f"tokenizing -> {prefix}.bin", unit=" docs", disable=not progress, mininterval=1)
    tokens = 0
    for ids in bar:
        builder.add_item(torch.tensor(ids))
        builder.end_document()
        tokens += len(ids)
        bar.set_postfix(tokens=tokens, refresh=False)
    builder.finalize(f"{prefix}.idx")
    return prefix


class _EncodeDocument:
    """A picklable ``document -> ids + [eos]`` for worker processes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, document: str) -> list[int]:
        return list(self.tokenizer.encode(document)) + [self.tokenizer.eos_token_id]


# --------------------------------------------------------------------------------- blends
def indexed_prefix(source: str | Path) -> str | None:
    """``a.bin``, ``a.idx`` or ``a`` -> ``"a"`` when ``a.bin`` and ``a.idx`` exist, else ``None``."""
    prefix = str(source).removesuffix(".bin").removesuffix(".idx")
    return prefix if Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists() else None


def parse_blend(sources: Sequence[str | Path]) -> tuple[list[str], list[float] | None]:
    """A Megatron ``--data-path`` list -> ``(prefixes, weights or None)``.

    Either prefixes (``["a", "b.bin"]``: weighted by their sizes) or weight/prefix pairs
    (``["0.7", "a", "0.3", "b"]``). Every prefix must have its ``.bin`` and ``.idx``.
    """
    items = [str(s) for s in sources]
    weighted = len(items) % 2 == 0 and all(_is_number(w) for w in items[::2])
    weights = [float(w) for w in items[::2]] if weighted else None
    names = items[1::2] if weighted else items
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"blend weights {weights} must be >= 0 with a positive sum")
    prefixes = []
    for name in names:
        prefix = indexed_prefix(name)
        if prefix is None:
            raise FileNotFoundError(
                f"{name!r}: no {name.removesuffix('.bin').removesuffix('.idx')}.bin/.idx; make them with "
                "`lightning-megatron preprocess`, or write a blend as weight/prefix pairs: ['0.7', 'a', '0.3', 'b']"
            )
        prefixes.append(prefix)
    return prefixes, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class _Eod:
    """What Megatron's GPT dataset reads from a tokenizer. With no ``pad`` it pads with -1,
    an id that never occurs in the data (the ``.idx`` header gives the token dtype)."""

    eod: int
    vocab_size: int | None = None

    @property
    def unique_identifiers(self) -> dict[str, int]:  # part of Megatron's cache key
        return {"eod": self.eod}


class MegatronRows(Dataset):
    """A Megatron ``GPTDataset``/``BlendedDataset`` in this library's batch convention:
    ``{"input_ids", "labels"}`` (``GPTModule`` shifts the labels), plus ``segment_ids`` and
    restarting ``position_ids`` per document when ``document_mask`` is set."""

    def __init__(self, dataset: Any, eod: int, document_mask: bool = False) -> None:
        self.dataset, self.eod, self.document_mask = dataset, eod, document_mask

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.dataset[index]["tokens"]
        row = {"input_ids": tokens, "labels": tokens.clone()}
        if self.document_mask:
            # A document ends with its end-of-document token; the next one starts a new segment.
            starts = torch.zeros_like(tokens)
            starts[1:] = tokens[:-1] == self.eod
            segments = 1 + starts.cumsum(0)
            first = torch.searchsorted(segments, segments)  # index of each segment's first token
            row.update(segment_ids=segments, position_ids=torch.arange(len(tokens)) - first)
        return row


def build_megatron_datasets(
    blend: Sequence[str | Path],
    seq_length: int,
    eod: int,
    split: str = "99,1,0",
    num_samples: Sequence[int | None] = (None, None, None),
    seed: int = 1234,
    path_to_cache: str | Path | None = None,
    document_mask: bool = False,
) -> list[MegatronRows | None]:
    """Train/validation/test datasets built by Megatron-Core's ``BlendedMegatronDatasetBuilder``.

    Args:
        blend: Megatron ``--data-path`` style, see :func:`parse_blend`.
        seq_length: tokens per row; rows are consecutive ``seq_length`` windows of the
            (shuffled) documents, the last position of a row has no target.
        eod: the end-of-document token id (what ``preprocess`` appends to each document).
        split: Megatron's split string, e.g. ``"949,50,1"`` (documents of each source are split).
        num_samples: rows wanted per split; ``None`` is one pass over the split. A weighted
            blend needs a number for every split it builds (Megatron's rule).
        seed: seeds Megatron's document and sample shuffles.
        path_to_cache: where the index files are cached (default ``PREFIX-cache/`` beside the first
            source); the next run with the same blend and settings reads them instead.
        document_mask: keep attention, positions and loss inside each document.

    Every rank must call this (rank 0 builds the indices first, the others then read the cache).
    Returns ``[train, validation, test]``, ``None`` for a split with no share.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    require_dataset_helpers()
    prefixes, weights = parse_blend(blend)
    shares = _shares(split)
    # Megatron asks a number of every split of a weighted blend, even of one with no share.
    num_samples = [0 if share == 0 else n for n, share in zip(num_samples, shares, strict=True)]
    missing = [name for name, n in zip(("train", "validation", "test"), num_samples, strict=True) if n is None]
    if weights is not None and missing:
        raise ValueError(
            f"a weighted blend needs the number of rows of each split it builds; {missing} have none: "
            "pass train_samples=... (or Trainer(max_steps=...)) and val_samples=..."
        )
    cache = Path(path_to_cache) if path_to_cache else Path(f"{prefixes[0]}-cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(cache),
        tokenizer=_Eod(eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        # Our batches hold seq_length tokens and the module shifts labels, so samples do not
        # overlap by the extra target token Megatron-LM reads.
        add_extra_token_to_sequence=False,
    )
    with _process_group(cache):
        built = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
    return [None if d is None else MegatronRows(d, eod, document_mask) for d in built]


def _shares(split: str) -> list[float]:
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    return parse_and_normalize_split(split)


def split_sizes(split: str, train_samples: int) -> list[int]:
    """Rows per split that keep the split's proportions, given the training rows."""
    train_share, *others = _shares(split)
    if train_share <= 0:
        raise ValueError(f"split={split!r} gives the training split no share")
    return [train_samples] + [math.ceil(train_samples * share / train_share) for share in others]


def require_dataset_helpers() -> None:
    """Megatron's index builders are C++ (``megatron/core/datasets/helpers_cpp``). The
    megatron-core wheels on PyPI ship it compiled (checked: 0.16.1 cp311/cp312 manylinux x86_64);
    a source install may not have it."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "megatron.core.datasets.helpers_cpp is not compiled in this megatron-core install; install the "
            "binary wheel (pip install megatron-core), or compile it once with "
            "`python -c 'from megatron.core.datasets.utils import compile_helpers; compile_helpers()'` "
            "(needs a C++ compiler and pybind11)"
        ) from error


@contextlib.contextmanager
def _process_group(cache: Path) -> Iterator[None]:
    """Megatron's builders coordinate ranks through ``torch.distributed`` (rank 0 writes the
    cache, the others read it) and some of their cache paths assume it is initialized. Outside a
    distributed run, lend them a one-process group for the duration of the build, and hold a lock
    on the cache directory: separate processes (say, each rank calling ``setup()`` before
    ``fit``) then build it one after the other instead of writing the same files at once."""
    if torch.distributed.is_initialized():
        yield
        return
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "a") as lock, tempfile.TemporaryDirectory() as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = torch.distributed.FileStore(os.path.join(tmp, "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()
