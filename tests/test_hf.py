"""Hugging Face <-> Megatron conversion, against transformers models as the reference.

Tolerance: fp32 on CPU. Dense families match transformers' logits exactly in our runs; MoE
families within ~2e-6 (the router's softmax/top-k and expert sums are ordered differently). We
assert 1e-4 absolute on logits of magnitude ~3, and identical top-1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy, export_hf
from tests.conftest import SCRIPTS, run_job
from tests.hf_models import CONFIGS, hf_logits, make_hf_model

FAMILIES = sorted(CONFIGS)
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
DENSE = [f for f in FAMILIES if f not in MOE]
IDS = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_hf_model(family, root / family) for family in FAMILIES}


def rows(ids):
    return DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=len(ids))


def megatron_logits(module, ids=IDS):
    trainer = L.Trainer(
        strategy=MegatronStrategy(),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.predict(module, rows(ids))[0][..., :250]


def assert_close(ours, reference, what):
    assert (ours - reference).abs().max().item() < 1e-4, what
    assert torch.equal(ours.argmax(-1), reference.argmax(-1)), what


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers(family, hf_dirs):
    assert_close(megatron_logits(GPTModule.from_hf(hf_dirs[family])), hf_logits(hf_dirs[family], IDS), family)


def save_unchanged(module, directory):
    """A torch_dist checkpoint of the imported weights (one step at lr 0 changes nothing)."""
    trainer = L.Trainer(
        strategy=MegatronStrategy(),
        accelerator="cpu",
        devices=1,
        logger=False,
        max_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=directory, every_n_train_steps=1)],
    )
    trainer.fit(module, rows(IDS))
    return next(Path(directory).glob("*.ckpt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise(family, hf_dirs, tmp_path):
    checkpoint = save_unchanged(GPTModule.from_hf(hf_dirs[family], lr=0.0, weight_decay=0.0), tmp_path / "ckpt")
    out = export_hf(checkpoint, tmp_path / "hf", progress=False)
    original, exported = load_file(hf_dirs[family] / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for name in original:
        assert torch.equal(original[name], exported[name]), name
    assert torch.equal(hf_logits(out, IDS), hf_logits(hf_dirs[family], IDS))


def test_export_without_source_builds_config_and_shards(hf_dirs, tmp_path):
    """No original HF directory: config.json comes from the GPTConfig; small shard size -> index."""
    source = tmp_path / "source"
    shutil.copytree(hf_dirs["qwen3_moe"], source)
    checkpoint = save_unchanged(GPTModule.from_hf(source, lr=0.0, weight_decay=0.0), tmp_path / "ckpt")
    shutil.rmtree(source)
    out = export_hf(checkpoint, tmp_path / "hf", max_shard_size=200_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert GPTConfig.from_hf(out) == GPTConfig.from_hf(hf_dirs["qwen3_moe"])
    assert (out / "generation_config.json").exists()
    assert torch.equal(hf_logits(out, IDS), hf_logits(hf_dirs["qwen3_moe"], IDS))


def test_export_refuses_a_non_empty_directory(hf_dirs, tmp_path):
    checkpoint = save_unchanged(GPTModule.from_hf(hf_dirs["qwen2"], lr=0.0), tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'gpt2'; supported: "):
        GPTModule.from_hf(tmp_path)


@pytest.mark.multiprocess
def test_import_under_tp2_pp2_ep2_and_export_after_training(hf_dirs, tmp_path):
    """Every family under TP2 and PP2, MoE also under EP2 (2 gloo ranks): logits equal transformers'.
    Then qwen2 trains 2 steps under TP2; its export's loss on the batch equals Megatron's."""
    from tests.scripts.hf_layouts import BATCH

    out = tmp_path / "logits.json"
    dense = [f"{f}={hf_dirs[f]}" for f in DENSE]
    run_job(
        [
            str(SCRIPTS / "hf_layouts.py"),
            "--devices",
            "2",
            "--models",
            *dense,
            "--layouts",
            "tp2",
            "pp2",
            "--train-save",
            str(tmp_path / "ckpt"),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
    )
    results = json.loads(out.read_text())
    moe_out = tmp_path / "moe.json"
    moe = [f"{f}={hf_dirs[f]}" for f in MOE]
    run_job(
        [
            str(SCRIPTS / "hf_layouts.py"),
            "--devices",
            "2",
            "--models",
            *moe,
            "--layouts",
            "ep2",
            "tp2_ep2_etp1_sp",
            "pp2",
            "--out",
            str(moe_out),
        ],
        cwd=tmp_path,
    )
    results.update(json.loads(moe_out.read_text()))
    for key, logits in results.items():
        if key == "trained_val_loss":
            continue
        family = key.split("/")[0]
        assert_close(torch.tensor(logits), hf_logits(hf_dirs[family], BATCH[:1])[0], key)
    assert len(results) == 2 * len(DENSE) + 3 * len(MOE) + 1

    exported = export_hf(next((tmp_path / "ckpt").glob("*.ckpt")), tmp_path / "trained-hf", progress=False)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32)
    with torch.no_grad():
        hf_loss = model(BATCH, labels=BATCH).loss.item()
    assert hf_loss == pytest.approx(results["trained_val_loss"], abs=1e-4)
