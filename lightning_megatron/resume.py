"""What exact resume needs besides weights and optimizer state: RNG states and the data position."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel
from torch.utils.data import DataLoader, IterableDataset


def rng_state() -> dict[str, Any]:
    """This rank's RNG states, in types torch's ``weights_only`` loader accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "megatron": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumableLoader:
    """Wraps the training DataLoader so a checkpoint records how far into the epoch training got,
    and a resumed run starts at the next unseen batch.

    Lightning saves and restores the state of any training loader with ``state_dict`` /
    ``load_state_dict``. The position comes from the strategy (batches *trained* this epoch), not
    from this iterator, which Lightning's prefetching runs ahead of. Skipped batches of a map-style
    dataset are not loaded at all: only their indices are drawn from the sampler.
    """

    def __init__(self, loader: DataLoader, batches_done: Callable[[], int]) -> None:
        self.loader = loader
        self._batches_done = batches_done
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        if skip == 0:
            return iter(self.loader)
        return _skip_batches(self.loader, skip)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        # sampler, batch_size, dataset...: Lightning reads these off the loader (set_epoch etc.).
        return getattr(self.__dict__["loader"], name)

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self._batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches_done"])


def _skip_batches(loader: DataLoader, skip: int) -> Iterator[Any]:
    map_style = type(loader) is DataLoader and not isinstance(loader.dataset, IterableDataset)
    if not map_style or loader.batch_sampler is None:
        return itertools.islice(iter(loader), skip, None)
    remaining = list(itertools.islice(iter(loader.batch_sampler), skip, None))
    workers = loader.num_workers
    return iter(
        DataLoader(
            loader.dataset,
            batch_sampler=remaining,
            num_workers=workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if workers else None,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if workers else None,
        )
    )
