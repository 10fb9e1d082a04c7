"""``map`` over worker processes, in order: tokenization of large datasets on every core."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_worker_fn: Callable[[Any], Any] | None = None


def _set_worker_fn(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _call_worker_fn(item: Any) -> Any:
    return _worker_fn(item)


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], num_proc: int = 1, chunksize: int = 64
) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed by ``num_proc`` processes (``1``: here).

    ``fn`` travels to each worker once (not once per item); an exception in a worker is raised
    here. Workers are forked where the platform allows it (no re-import of the caller), else spawned,
    and then ``fn`` must be picklable.
    """
    if num_proc <= 1:
        yield from map(fn, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, initializer=_set_worker_fn, initargs=(fn,)) as pool:
        yield from pool.imap(_call_worker_fn, items, chunksize)
