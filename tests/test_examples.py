"""Every example runs, at small size: pretraining under torchrun and under SLURM (1 node, 2 CPU
processes), SFT, and HF -> Megatron -> HF conversion."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, job_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.examples]
EXAMPLES = ROOT / "examples"
SMALL_PRETRAIN = ["--max-steps", "2", "--seq-length", "32", "--sample-tokens", "4"]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-8000:]}"
    return proc.stdout


def with_venv_path(env: dict[str, str], *dirs: Path) -> dict[str, str]:
    # `torchrun` and `python` in the scripts must be this interpreter's.
    return dict(env, PATH=os.pathsep.join([*map(str, dirs), str(Path(sys.executable).parent), env["PATH"]]))


def test_pretrain_under_torchrun(tmp_path):
    env = with_venv_path(job_env(GPUS_PER_NODE="2", NNODES="1", MASTER_PORT=str(random.randint(20000, 40000))))
    out = run(["bash", str(EXAMPLES / "launch_torchrun.sh"), *SMALL_PRETRAIN], cwd=tmp_path, env=env)
    assert "--- sample after 2 steps ---" in out, out[-4000:]


SRUN = """#!/usr/bin/env bash
# srun on a machine without SLURM: start SLURM_NTASKS copies of the command with the per-task
# variables srun sets (the same emulation as tests/conftest.py's run_like_srun).
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_pretrain_under_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    slurm = dict(
        SLURM_JOB_NAME="lightning-megatron",
        SLURM_JOB_ID=str(random.randint(1000, 9999)),  # Lightning derives MASTER_PORT from it
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_NODELIST="127.0.0.1",
    )
    env = with_venv_path(job_env(**slurm), bin_dir)
    out = run(["bash", str(EXAMPLES / "launch_slurm.sbatch"), *SMALL_PRETRAIN], cwd=ROOT, env=env)
    assert "--- sample after 2 steps ---" in out, out[-4000:]


def test_sft_example(tmp_path):
    out_dir = tmp_path / "sft"
    out = run([sys.executable, str(EXAMPLES / "sft_demo.py"), "--max-steps", "2", "--out", str(out_dir)], tmp_path)
    assert "Q: who are you?" in out and (out_dir / "hf" / "config.json").exists(), out[-4000:]


def test_convert_example(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "convert.py"), "--tp", "1", "--out", str(tmp_path / "out")], tmp_path)
    assert "round trip HF -> Megatron (tp=1) -> HF: max |logit diff|" in out and ": OK" in out, out[-4000:]
