"""Rows read and tokenized lazily from JSONL files, sharded by data-parallel rank and loader worker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

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

    Shards differ by at most one row, but rows a ``transform`` skips can make data-parallel ranks
    run out of batches at different steps within an epoch: train by ``max_steps`` within one
    pass, or keep every row (no ``drop`` truncation) and a row count divisible by the shards.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[str, dict[str, Any]], Any],
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Any]:
        rank, world = (self.rank, self.world_size) if self.rank is not None else data_parallel_rank_and_size()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shards, shard = world * workers, rank * workers + worker_id
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
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from error
                    item = self.transform(f"{path}:{number}", row)
                    if item is not None:
                        yield item
