"""`lightning-megatron export/check`: conversion both ways with the precision check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import job_env
from tests.hf_models import make_hf_model


def cli(*args, cwd):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_megatron.cli", *map(str, args)],
        cwd=cwd,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf_model("qwen2_moe", root / "hf")
    code, log = cli(
        "export", "--to-mcore", "--model", hf, "--output", root / "mcore", "--test-convert-precision", cwd=root
    )
    assert code == 0 and "precision check" in log and ": OK" in log, log
    return root, hf


def test_to_hf_with_precision_check(converted):
    root, _ = converted
    code, log = cli(
        "export", "--to-hf", "--load", root / "mcore", "--output", root / "back", "--test-convert-precision", cwd=root
    )
    assert code == 0 and ": OK" in log and "top-1 agreement 1.000" in log, log
    assert (root / "back" / "config.json").exists() and (root / "back" / "model.safetensors").exists()


def test_precision_check_fails_on_a_corrupted_conversion(converted, tmp_path):
    root, hf = converted
    import shutil

    corrupted = tmp_path / "corrupted"
    shutil.copytree(hf, corrupted)
    weights = load_file(corrupted / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])
    save_file(weights, corrupted / "model.safetensors", metadata={"format": "pt"})
    code, log = cli("check", "--model", corrupted, "--load", root / "mcore", cwd=tmp_path)
    assert code == 1 and "FAILED" in log, log
    code, log = cli("check", "--model", hf, "--load", root / "mcore", cwd=tmp_path)
    assert code == 0 and ": OK" in log, log


def test_missing_source_is_a_usage_error(tmp_path):
    code, log = cli("export", "--to-hf", "--output", tmp_path / "x", cwd=tmp_path)
    assert code == 2 and "--to-hf needs --load CKPT_DIR" in log
