"""Megatron indexed data: `lightning-megatron preprocess` writes Megatron's .bin/.idx, and
PretrainDataModule reads them through Megatron-Core's BlendedMegatronDatasetBuilder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lightning_megatron.data.indexed import build_megatron_datasets, preprocess
from lightning_megatron.data.pretrain import PretrainDataModule
from lightning_megatron.data.text import bundled_corpus
from lightning_megatron.data.tokenizer import train_tokenizer
from tests.conftest import SCRIPTS, job_env, run_job

SOURCES = {
    "alpha": [f"alpha document {i}: " + "red green blue " * (i % 7 + 1) for i in range(60)],
    "beta": [f"beta document {i}: " + "one two three four " * (i % 5 + 1) for i in range(60)],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources, one preprocessed by the CLI (two tokenizing processes), and the tokenizer."""
    root = tmp_path_factory.mktemp("indexed")
    tokenizer = train_tokenizer([bundled_corpus()[:60000]], vocab_size=512)
    tokenizer.save_pretrained(root / "tok")
    for name, docs in SOURCES.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cmd = [sys.executable, "-m", "lightning_megatron.cli", "preprocess", "--input", str(root / "alpha.jsonl")]
    cmd += ["--output-prefix", str(root / "out" / "alpha_text_document"), "--tokenizer", str(root / "tok")]
    proc = subprocess.run(cmd + ["--num-proc", "2"], env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stdout + proc.stderr
    assert "60 docs" in proc.stderr, proc.stderr  # the progress bar
    preprocess(SOURCES["beta"], root / "out" / "beta_text_document", tokenizer, progress=False)
    return root, tokenizer


def test_preprocess_writes_megatrons_indexed_format(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, tokenizer = corpus
    data = IndexedDataset(str(root / "out" / "alpha_text_document"))
    assert len(data) == len(SOURCES["alpha"])
    for i in (0, 17, 59):
        assert data[i].tolist() == tokenizer.encode(SOURCES["alpha"][i]) + [tokenizer.eos_token_id]


def blend(root, alpha=0.7, beta=0.3):
    return [str(alpha), str(root / "out" / "alpha_text_document"), str(beta), str(root / "out" / "beta_text_document")]


def test_blend_rows_are_windows_of_the_sources_in_the_blend_proportion(corpus):
    root, tokenizer = corpus
    train, val, test = build_megatron_datasets(
        blend(root), 16, tokenizer.eos_token_id, split="90,10,0", num_samples=[200, 20, None], seed=7
    )
    assert len(train) == 200 and len(val) == 20 and test is None
    eos = tokenizer.eos_token_id
    counts = {"alpha": 0, "beta": 0}
    for i in range(len(train)):
        row = train[i]
        ids = row["input_ids"].tolist()
        assert row["labels"].tolist() == ids and len(ids) == 16
        # Split at the end-of-document token: each piece is a run of one document's tokens.
        pieces, piece = [], []
        for token in ids:
            piece.append(token)
            if token == eos:
                pieces.append(piece)
                piece = []
        pieces.append(piece)
        texts = [tokenizer.decode([t for t in p if t != eos]) for p in pieces if p]
        source = "alpha" if "red" in " ".join(texts) or "alpha" in " ".join(texts) else "beta"
        counts[source] += 1
        for text in texts:
            assert any(text in doc for doc in SOURCES[source]), (i, text)
    assert counts["alpha"] == pytest.approx(140, abs=2) and counts["beta"] == pytest.approx(60, abs=2)


def test_blend_is_deterministic_for_a_seed_and_cached(corpus, tmp_path):
    root, tokenizer = corpus

    def rows(seed, cache):
        train, *_ = build_megatron_datasets(
            blend(root),
            16,
            tokenizer.eos_token_id,
            split="1,0,0",
            num_samples=[64, None, None],
            seed=seed,
            path_to_cache=cache,
        )
        return [train[i]["input_ids"].tolist() for i in range(len(train))]

    first = rows(1, tmp_path / "cache")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any("BlendedDataset-train" in name for name in cached) and any("GPTDataset" in name for name in cached)
    # Megatron reads its index files back: remove the sources' tokens from the picture by
    # checking the cache was read, not rebuilt (its files are unchanged) and rows are equal.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert rows(1, tmp_path / "cache") == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps
    assert rows(2, tmp_path / "cache") != first


def test_document_mask_restarts_positions_after_each_document(corpus):
    root, tokenizer = corpus
    (train, *_) = build_megatron_datasets(
        [str(root / "out" / "beta_text_document")], 64, tokenizer.eos_token_id, split="1,0,0", document_mask=True
    )
    row = train[0]
    ids, segments, positions = row["input_ids"], row["segment_ids"], row["position_ids"]
    ends = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
    assert ends and ends[0] < 63
    assert segments[ends[0]] == 1 and segments[ends[0] + 1] == 2 and positions[ends[0] + 1] == 0
    assert positions[: ends[0] + 1].tolist() == list(range(ends[0] + 1))
    assert np.all(np.diff(segments.numpy()) >= 0)


def test_bad_blends_are_explained(corpus):
    root, tokenizer = corpus
    with pytest.raises(FileNotFoundError, match="no .*gamma_text_document.bin/.idx; make them with"):
        build_megatron_datasets(
            ["0.5", str(root / "out" / "alpha_text_document"), "0.5", str(root / "gamma_text_document.bin")], 16, 0
        )
    with pytest.raises(ValueError, match="weighted blend needs the number of rows"):
        build_megatron_datasets(blend(root), 16, tokenizer.eos_token_id, split="90,10,0")
    with pytest.raises(ValueError, match="mix indexed"):
        PretrainDataModule([root / "out" / "alpha_text_document.bin", root / "alpha.jsonl"], tokenizer)


def test_pretrain_datamodule_trains_a_blend_under_dp2_and_resumes(corpus, tmp_path):
    """2 CPU ranks: each rank's batches are its share of Megatron's global order, the loss falls,
    and a run resumed from step 2 sees exactly the batches of the uninterrupted run."""
    root, _ = corpus
    out = tmp_path / "result.json"
    args = [str(SCRIPTS / "pretrain_indexed.py"), "--tokenizer", str(root / "tok"), "--out", str(out)]
    run_job(args + ["--blend", *blend(root)], cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    dataset = result["expected"]  # Megatron's training rows, in order, built in one process
    batch, steps = 2, 4
    for rank in range(2):
        seen = result["batches"][str(rank)]
        assert len(seen) == steps
        for step, rows in enumerate(seen):
            start = step * batch * 2
            assert rows == [dataset[start + rank + 2 * k] for k in range(batch)], (rank, step)
    assert result["loss"][-1] < result["loss"][0]
    assert result["resumed"] == {r: seen[2:] for r, seen in result["batches"].items()}
