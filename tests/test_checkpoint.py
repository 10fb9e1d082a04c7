"""torch_dist checkpoints in one process: exact resume, ModelCheckpoint, async, options, bad input.

Multi-rank resume and resharding: test_checkpoint_layouts.py. A save killed half-way:
test_killed_save_leaves_last_checkpoint_loadable below (a subprocess kills itself).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from megatron.core.dist_checkpointing.serialization import load_plain_tensors

from lightning_megatron import (
    CheckpointError,
    GPTConfig,
    GPTModule,
    MegatronCheckpointIO,
    MegatronStrategy,
    versioned_dir,
)
from tests.conftest import SCRIPTS, run_job
from tests.test_training import CONFIG, Losses, loader


def module(**config):
    return GPTModule(GPTConfig.preset("qwen2", **{**CONFIG, **config}), lr=3e-3, lr_decay="constant")


def fit(steps, ckpt_path=None, callbacks=(), io=None, model=None, precision="32-true"):
    """Train; return (per-step losses, trainer). 40 batches of 4: no epoch ends in these runs."""
    losses = Losses()
    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=2, checkpoint_io=io),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses, *callbacks],
        limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(model or module(), loader(batch_size=4, chars=40000), ckpt_path=ckpt_path)
    return losses.values, trainer


def every(dirpath, n=2, **kwargs):
    return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=n, save_top_k=-1, **kwargs)


def tensors(tree, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint dict, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """8 uninterrupted fp32 steps, and a run of 4 that saved at steps 2 and 4."""
    root = tmp_path_factory.mktemp("saved")
    uninterrupted, _ = fit(8)
    first_half, _ = fit(4, callbacks=[every(root)])
    return {
        "dir": root,
        "step4": root / "epoch=0-step=4.ckpt",
        "uninterrupted": uninterrupted,
        "first_half": first_half,
    }


def test_resume_is_exact(saved):
    """Model, Adam state, scheduler, RNG and data position: the resumed steps are bitwise equal."""
    assert saved["first_half"] == saved["uninterrupted"][:4]
    resumed, trainer = fit(8, ckpt_path=saved["step4"])
    assert resumed == saved["uninterrupted"][4:]
    assert trainer.global_step == 8 and trainer.strategy.consumed_samples == 32


def test_checkpoint_directory_and_info(saved):
    path = saved["step4"]
    names = {p.name for p in path.iterdir()}
    assert {"lightning_megatron.json", "metadata.json", "common.pt", ".metadata"} <= names
    assert not list(saved["dir"].glob("*.partial"))
    info = json.loads((path / "lightning_megatron.json").read_text())
    assert info["global_step"] == 4 and info["consumed_samples"] == 16
    assert info["model_config"]["num_layers"] == 2 and info["layout"]["tp"] == 1
    assert set(info["versions"]) == {"lightning_megatron", "megatron_core", "torch", "lightning"}
    assert {"state_dict", "optimizer_states", "rng_state", "loops", "lr_schedulers"} <= set(info["contents"])


def test_model_checkpoint_top_k_deletes_old_directories(tmp_path):
    callback = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_top_k=2, monitor="train/loss", save_last=True, filename="{step}"
    )
    losses, _ = fit(5, callbacks=[callback])
    kept = sorted(p.name for p in tmp_path.iterdir())
    best_two = sorted(range(5), key=lambda i: losses[i])[:2]
    assert kept == sorted(["last.ckpt"] + [f"step={i + 1}.ckpt" for i in best_two])
    assert json.loads((tmp_path / "last.ckpt" / "lightning_megatron.json").read_text())["global_step"] == 5


def test_async_save_equals_sync_save(tmp_path, saved):
    async_losses, _ = fit(4, callbacks=[every(tmp_path)], io=MegatronCheckpointIO(async_save=True))
    assert async_losses == saved["first_half"]
    with torch.serialization.safe_globals([GPTConfig]):
        sync, asynchronous = (load_plain_tensors(str(d / "epoch=0-step=4.ckpt")) for d in (saved["dir"], tmp_path))
    sync, asynchronous = tensors(sync), tensors(asynchronous)
    assert len(sync) >= 13 and sync.keys() == asynchronous.keys()  # the weights
    for key in sync:
        assert torch.equal(sync[key], asynchronous[key]), key
    # The optimizer state (flat dp_reshardable buckets) is checked through what it does:
    resumed, _ = fit(8, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert resumed == saved["uninterrupted"][4:]


def test_bf16_resume_is_exact(tmp_path):
    uninterrupted, _ = fit(6, precision="bf16-mixed")
    fit(3, callbacks=[every(tmp_path, 3)], precision="bf16-mixed")
    resumed, _ = fit(6, ckpt_path=tmp_path / "epoch=0-step=3.ckpt", precision="bf16-mixed")
    assert resumed == uninterrupted[3:]  # the fp32 master weights travel in the optimizer state


def test_no_save_optim_and_rng(tmp_path, saved):
    fit(2, callbacks=[every(tmp_path)], io=MegatronCheckpointIO(no_save_optim=True, no_save_rng=True))
    path = tmp_path / "epoch=0-step=2.ckpt"
    contents = json.loads((path / "lightning_megatron.json").read_text())["contents"]
    assert "optimizer_states" not in contents and "rng_state" not in contents
    with pytest.raises(CheckpointError, match="no_load_optim=True"):
        fit(4, ckpt_path=path)
    # Weights, scheduler and loops still resume; Adam starts again, so steps 3-4 differ.
    resumed, trainer = fit(4, ckpt_path=path, io=MegatronCheckpointIO(no_load_optim=True))
    assert trainer.global_step == 4 and len(resumed) == 2 and resumed[0] == saved["uninterrupted"][2]


def test_finetune_loads_weights_only(saved):
    fresh, _ = fit(2)
    tuned, trainer = fit(2, ckpt_path=saved["step4"], io=MegatronCheckpointIO(finetune=True))
    assert trainer.global_step == 2 and trainer.strategy.consumed_samples == 8  # counters restarted
    assert tuned[0] < fresh[0] - 0.3  # but the weights are the trained ones


def test_validate_from_checkpoint(saved):
    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=2),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    from_checkpoint = trainer.validate(module(), loader(), ckpt_path=saved["step4"])[0]["val/loss"]
    fresh = trainer.validate(module(), loader())[0]["val/loss"]
    assert from_checkpoint < fresh - 0.3


def test_versioned_dir(tmp_path):
    first = versioned_dir(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("v0-")
    first.mkdir()
    assert versioned_dir(tmp_path).name.startswith("v1-")


# ------------------------------------------------------------------------------ bad input
def test_missing_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(1, ckpt_path=tmp_path / "nope.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match="is a file, not a torch_dist checkpoint"):
        fit(1, ckpt_path=plain)
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="not a complete lightning_megatron checkpoint"):
        fit(1, ckpt_path=tmp_path / "other")


def test_other_model_config_is_named(saved):
    before = digest(saved["step4"])
    with pytest.raises(CheckpointError, match="num_layers: 2 in the checkpoint, 3 here"):
        fit(1, ckpt_path=saved["step4"], model=module(num_layers=3))
    assert digest(saved["step4"]) == before


def test_truncated_checkpoint_is_refused(tmp_path, saved):
    copy = tmp_path / "copy.ckpt"
    import shutil

    shutil.copytree(saved["step4"], copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        fit(5, ckpt_path=copy)
    (copy / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks common.pt"):
        fit(5, ckpt_path=copy)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_tampered_metadata_never_unpickles_code(tmp_path, saved, capsys):
    import shutil

    copy = tmp_path / "copy.ckpt"
    shutil.copytree(saved["step4"], copy)
    (copy / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="refers to builtins.print"):
        fit(5, ckpt_path=copy)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.multiprocess
def test_killed_save_leaves_last_checkpoint_loadable(tmp_path, saved):
    """The job kills itself (SIGKILL) after step 4's shards are written, before it is published."""
    run_job([str(SCRIPTS / "killed_save.py"), str(tmp_path)], cwd=tmp_path, expect_returncode=-9)
    assert (tmp_path / "epoch=0-step=2.ckpt").is_dir()
    assert not (tmp_path / "epoch=0-step=4.ckpt").exists()
    assert (tmp_path / "epoch=0-step=4.ckpt.partial").is_dir()
    with pytest.raises(CheckpointError, match="that save did not finish"):
        fit(6, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    resumed, _ = fit(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt", callbacks=[every(tmp_path)])
    assert resumed == saved["uninterrupted"][2:4]
    # The next save of step 4 replaced the leftovers of the killed one.
    assert (tmp_path / "epoch=0-step=4.ckpt").is_dir() and not (tmp_path / "epoch=0-step=4.ckpt.partial").exists()
