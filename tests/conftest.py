"""Shared helpers: launching multi-process jobs and reading their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def run_job(args: list[str], cwd: Path, timeout: int = 600, launcher: list[str] | None = None) -> None:
    """Run a test script (Lightning's own launcher starts the other ranks); fail with its log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def train_layouts(tmp_path: Path, devices: int, model: str, layouts: list[str],
                  accelerator: str = "cpu", **kwargs) -> dict:
    out = tmp_path / f"{model}-{devices}.json"
    args = [str(SCRIPTS / "train_layouts.py"), "--devices", str(devices), "--model", model,
            "--layouts", *layouts, "--accelerator", accelerator, "--out", str(out)]
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
