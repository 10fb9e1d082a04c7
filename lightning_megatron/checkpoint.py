"""torch_dist checkpoints: Megatron-Core's ``dist_checkpointing`` behind Lightning's ``CheckpointIO``.

A checkpoint is a directory (Lightning's ``.ckpt`` name is kept, so ``ModelCheckpoint``,
``last.ckpt`` and ``fit(ckpt_path=...)`` work unchanged)::

    step=8.ckpt/
        lightning_megatron.json   human-readable: versions, model config, layout, step, samples
        metadata.json             Megatron's format marker
        common.pt                 Lightning's loop/callback/scheduler state (rank 0)
        .metadata, __*_*.distcp   the sharded tensors (every rank writes its own shards)

Every rank writes into ``<name>.partial``; only when all shards and metadata are on disk does rank
0 write ``lightning_megatron.json`` and rename the directory, so a checkpoint is either complete
or invisible. The strategy builds the state (sharded model and optimizer state, RNG) and the
template to load into; this module only moves it to and from disk.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException  # a BaseException

from lightning_megatron.parallel import global_rank

INFO_FILE = "lightning_megatron.json"
OPTIM_FORMATS = ("dp_reshardable", "fully_reshardable")
FORMAT = "lightning_megatron/torch_dist/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: missing, incomplete, foreign or for another model."""


class MegatronCheckpointIO(CheckpointIO):
    """Save and load sharded ``torch_dist`` checkpoints; the default of :class:`MegatronStrategy`.

    The options mirror Megatron-SWIFT's (and Megatron-LM's) flags:

    Args:
        async_save: write shards in a background process; training goes on meanwhile. A save is
            finalized (made visible) before the next one starts and at the end of training.
        no_save_optim: leave the optimizer state out (weights, scheduler and loop state only).
        no_save_rng: leave RNG states out.
        no_load_optim: load weights, scheduler and loop state but start a fresh optimizer.
        no_load_rng: do not restore RNG states.
        finetune: load the weights only and start at step 0 (new optimizer, scheduler, loops).
        optim_format: how the distributed optimizer's state is laid out (Megatron-Core's
            ``distrib_optim_sharding_type``). ``"dp_reshardable"`` (default): each rank writes its
            own shard, no communication or extra memory; loads under another data-parallel size
            only. ``"fully_reshardable"``: gathered per data-parallel group on save (extra GPU
            memory for the gather); loads under any TP/PP/DP layout. Weights always reshard.

    Example::

        strategy = MegatronStrategy(tp=2, checkpoint_io=MegatronCheckpointIO(async_save=True))
    """

    def __init__(
        self,
        async_save: bool = False,
        no_save_optim: bool = False,
        no_save_rng: bool = False,
        no_load_optim: bool = False,
        no_load_rng: bool = False,
        finetune: bool = False,
        optim_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable",
    ) -> None:
        if optim_format not in OPTIM_FORMATS:
            raise ValueError(f"optim_format={optim_format!r}; choose one of {OPTIM_FORMATS}")
        self.async_save = async_save
        self.no_save_optim = no_save_optim
        self.no_save_rng = no_save_rng
        self.no_load_optim = no_load_optim
        self.no_load_rng = no_load_rng
        self.finetune = finetune
        self.optim_format = optim_format
        self._queue = AsyncCallsQueue() if async_save else None

    # ------------------------------------------------------------------------------- saving
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Called on every rank with this rank's sharded state and the JSON-able ``info``."""
        if storage_options is not None:
            raise TypeError(f"MegatronCheckpointIO takes no storage_options (got {storage_options!r})")
        if "lightning_megatron" not in checkpoint:
            # Not from the strategy: Lightning's fork/spawn launcher handing rank 0's plain
            # state_dict back to the main process through a temporary file.
            return TorchCheckpointIO().save_checkpoint(checkpoint, path)
        self.finalize(blocking=True)  # one save in flight at a time; the previous one lands first
        checkpoint = dict(checkpoint)
        info = checkpoint.pop("lightning_megatron")
        if self.no_save_optim:
            checkpoint.pop("optimizer_states", None)
        if self.no_save_rng:
            checkpoint.pop("rng_state", None)
        info["contents"] = sorted(checkpoint)
        path = Path(path)
        staging = path.with_name(path.name + ".partial")
        if global_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that was killed
            staging.mkdir(parents=True)
        _barrier()
        request = dist_checkpointing.save(
            checkpoint, str(staging), sharded_strategy=("torch_dist", 1), async_sharded_save=self.async_save
        )
        publish = partial(_publish, staging, path, info)
        if request is None:
            publish()
        else:
            # Megatron's finalize step writes metadata.json after every rank's shards are written;
            # publishing (the rename) comes after it.
            request.add_finalize_fn(publish)
            assert self._queue is not None
            self._queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> None:
        """Publish finished async saves (all of them when ``blocking``); called on every rank."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete a checkpoint directory (the strategy calls this on one rank per node)."""
        if Path(path).is_file():
            Path(path).unlink()
        shutil.rmtree(path, ignore_errors=True)

    def teardown(self) -> None:
        # Lightning's Strategy.teardown calls this: an async save still in flight lands now.
        self.finalize(blocking=True)

    # ------------------------------------------------------------------------------ loading
    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = None,
        weights_only: bool | None = None,
        sharded_state_dict: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Load the parts of ``sharded_state_dict`` (the strategy's template) this rank holds."""
        if sharded_state_dict is None:  # the launcher's hand-off file (see save_checkpoint)
            return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=True)
        path = Path(path)
        read_info(path)  # refuses missing, incomplete and foreign directories
        _check_pickled_metadata(path / ".metadata")
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                return dist_checkpointing.load(sharded_state_dict, str(path))
        except (Exception, DCPCheckpointException) as error:  # re-raised with the path and what to do
            raise CheckpointError(
                f"could not read checkpoint {path}: {type(error).__name__}: {error}. If a file was "
                "truncated or deleted, load an earlier checkpoint; if the model or layout changed, "
                "see lightning_megatron.json in the checkpoint for what it holds"
            ) from error


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``lightning_megatron.json``, after checking the directory is complete."""
    path = Path(path)
    if not path.exists():
        partial_dir = path.with_name(path.name + ".partial")
        hint = f" ({partial_dir} exists: that save did not finish)" if partial_dir.exists() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file, not a torch_dist checkpoint directory; MegatronStrategy saves and "
            "loads sharded checkpoints written by MegatronCheckpointIO (for Hugging Face weights "
            "use GPTModule.from_hf)"
        )
    info_file = path / INFO_FILE
    if not info_file.exists():
        raise CheckpointError(
            f"{path} has no {INFO_FILE}: it is not a complete lightning_megatron checkpoint "
            "(a save that was interrupted, or another tool's directory)"
        )
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{info_file} is not valid JSON ({error}); the checkpoint is damaged") from error
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {info.get('format')!r}; this version reads {FORMAT!r}")
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} lacks {name}; it is incomplete, load an earlier one")
    return info


def versioned_dir(root: str | os.PathLike) -> Path:
    """``root/v<N>-<YYYYmmdd-HHMMSS>``, N one more than the highest existing version
    (Megatron-SWIFT's ``add_version``). Pass it as ``ModelCheckpoint(dirpath=...)``: Lightning
    broadcasts rank 0's ``dirpath``, so all ranks agree on the name."""
    import time

    root = Path(root)
    versions = [int(p.name[1:].split("-")[0]) for p in root.glob("v*-*") if p.name[1:].split("-")[0].isdigit()]
    return root / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}"


def _publish(staging: Path, path: Path, info: dict[str, Any]) -> None:
    """Make a finished save visible: write the info file, then rename (rank 0 only)."""
    if global_rank() != 0:
        return
    (staging / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    old = path.with_name(path.name + ".old")
    if path.exists():  # e.g. last.ckpt overwritten: keep it until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


class _MetadataUnpickler(pickle.Unpickler):
    """Reads torch DCP's ``.metadata`` pickle, refusing every class outside DCP's metadata types."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith(self.ALLOWED_MODULES) or (module, name) in self.ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which a torch_dist checkpoint never does"
        )


def _check_pickled_metadata(metadata: Path) -> None:
    # torch DCP unpickles .metadata with plain pickle; read it once with an allowlist first so a
    # foreign or tampered checkpoint cannot run code.
    with open(metadata, "rb") as f:
        try:
            _MetadataUnpickler(f).load()
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{metadata} is unreadable ({error}); the checkpoint is damaged") from error


def _safe_globals() -> list[Any]:
    """Our own plain dataclasses may appear in saved hyperparameters; nothing else is allowed."""
    from lightning_megatron.models.config import GPTConfig, RecomputeConfig

    return [GPTConfig, RecomputeConfig]


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
