"""Shared helpers: launching multi-process jobs and reading their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def job_env(**extra: str) -> dict[str, str]:
    """Environment for a child job: without the rendezvous variables that in-process fits left
    behind (the parent still holds that MASTER_PORT)."""
    env = {
        k: v
        for k, v in os.environ.items()
        # PL_GLOBAL_SEED: an in-process LightningCLI run (seed_everything) must not seed child jobs.
        if k not in {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "PL_GLOBAL_SEED"}
    }
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def run_job(
    args: list[str], cwd: Path, timeout: int = 600, launcher: list[str] | None = None, expect_returncode: int = 0
) -> None:
    """Run a test script (Lightning's own launcher starts the other ranks); fail with its log."""
    env = job_env()
    cmd = (launcher or [sys.executable]) + args
    # The log goes to a file, not a pipe: a helper process that outlives a killed job (Megatron's
    # checkpoint writer) would otherwise keep the pipe open.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        log.seek(0)
        output = log.read()
    if proc.returncode != expect_returncode:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{output[-12000:]}")


def run_like_srun(args: list[str], cwd: Path, ntasks: int, timeout: int = 600) -> None:
    """Start ``ntasks`` copies of a script with the variables ``srun --ntasks-per-node`` sets,
    so Lightning's SLURMEnvironment (not its own launcher) wires up the ranks."""
    procs = []
    for rank in range(ntasks):
        env = job_env(
            SLURM_JOB_NAME="train",
            SLURM_JOB_ID="4242",
            SLURM_NTASKS=str(ntasks),
            SLURM_NTASKS_PER_NODE=str(ntasks),
            SLURM_NNODES="1",
            SLURM_NODEID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODELIST="127.0.0.1",
            MASTER_ADDR="127.0.0.1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        if proc.returncode != 0:
            pytest.fail(f"SLURM-style rank {rank} exited {proc.returncode}\n{log[-8000:]}")


def train_layouts(
    tmp_path: Path,
    devices: int,
    model: str,
    layouts: list[str],
    accelerator: str = "cpu",
    extra: list[str] = (),
    srun: bool = False,
    **kwargs,
) -> dict:
    out = tmp_path / f"{model}-{devices}.json"
    args = [
        str(SCRIPTS / "train_layouts.py"),
        "--devices",
        str(devices),
        "--model",
        model,
        "--layouts",
        *layouts,
        "--accelerator",
        accelerator,
        "--out",
        str(out),
        *extra,
    ]
    if srun:
        run_like_srun(args, cwd=tmp_path, ntasks=devices, **kwargs)
    else:
        run_job(args, cwd=tmp_path, **kwargs)
    return json.loads(out.read_text())


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    # Multi-rank tests run several processes on a 2-core machine; keep in-process tests lean too.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """One-process runs of each test model: the reference every layout must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {model: train_layouts(tmp, 1, model, ["tp1"])["tp1"] for model in ("moe", "tied")}
    runs["dense"] = train_layouts(tmp, 1, "dense", ["tp1"], extra=["--predict"])["tp1"]
    return runs


def assert_same_run(run: dict, reference: dict, layout: str) -> None:
    assert run["loss"] == pytest.approx(reference["loss"], abs=1e-4), f"{layout} losses differ"
    assert run["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), f"{layout} grad norms differ"
    if "logits" in run:
        assert run["logits"] == pytest.approx(reference["logits"], abs=1e-3), f"{layout} predictions differ"
