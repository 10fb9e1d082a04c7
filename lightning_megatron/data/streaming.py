"""Rows tokenized lazily: streamed from JSONL files (sharded by data-parallel rank and loader worker),
or held as read and tokenized on access."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lightning_megatron.data.sft import DataFormatError


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This process's data-parallel rank and size (Megatron's groups when initialized)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingRows(IterableDataset):
    """Row ``i`` of the concatenated files goes to shard ``i % shards``, one shard per
    (data-parallel rank, DataLoader worker): every row is used once per epoch, by one reader.
    Tensor/pipeline-parallel peers of a data-parallel rank read the same rows.

    Nothing is held in memory but the current row; ``transform(where, row)`` tokenizes it (and
    returns ``None`` to skip it, e.g. too long under ``truncation="drop"``). A resumed run skips
    what was trained through the strategy's data position (those rows are read again, not trained).

    Every data-parallel rank must run the same number of steps, or the others wait forever in
    the gradient all-reduce. With a ``filler`` (a sample that carries no loss) each shard yields
    exactly ``ceil(rows / shards)`` samples: a skipped row, and the one row a shard is short of
    when ``rows`` does not divide evenly, become fillers. Without one, shards differ by a row and
    skipped rows shift them further: only for single-process use.

    The rows are counted once, at construction (a pass over the files' lines, no JSON parsing).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[str, dict[str, Any]], Any],
        rank: int | None = None,
        world_size: int | None = None,
        filler: Any = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.filler = filler
        self.rows = sum(_count_rows(path) for path in self.paths)

    def __iter__(self) -> Iterator[Any]:
        rank, world = (self.rank, self.world_size) if self.rank is not None else data_parallel_rank_and_size()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shards, shard = world * workers, rank * workers + worker_id
        yielded = 0
        for where, row in self._my_rows(shard, shards):
            item = self.transform(where, row)
            if item is None and self.filler is not None:
                item = self.filler
            if item is not None:
                yielded += 1
                yield item
        if self.filler is not None:
            for _ in range(-(-self.rows // shards) - yielded):
                yield self.filler

    def _my_rows(self, shard: int, shards: int) -> Iterator[tuple[str, dict[str, Any]]]:
        index = 0
        for path in self.paths:
            try:
                handle = open(path, encoding="utf-8")
            except OSError as error:
                raise DataFormatError(f"{path}: cannot read ({error})") from error
            with handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    mine, index = index % shards == shard, index + 1
                    if not mine:
                        continue
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from error


def _count_rows(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: cannot read ({error})") from error


class LazyRows(Dataset):
    """Rows held as read (``(where, row)`` pairs); ``transform(where, row)`` tokenizes one when it
    is asked for, in the DataLoader's workers. A row it skips (``None``) becomes ``filler``: a
    map-style dataset cannot leave a hole, and a sample without loss keeps every rank's count."""

    def __init__(self, rows: Sequence[tuple[str, Any]], transform: Callable[[str, Any], Any], filler: Any) -> None:
        self.rows, self.transform, self.filler = rows, transform, filler

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        item = self.transform(*self.rows[index])
        return self.filler if item is None else item
