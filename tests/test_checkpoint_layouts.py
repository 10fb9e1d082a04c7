"""Multi-rank checkpoints: exact resume, and resharding a checkpoint onto another layout.

A layout "A@B" resumes layout A from layout B's step-2 checkpoint and trains steps 3-4 (see
tests/scripts/train_layouts.py). Same layout: the resumed losses are bitwise those of the run that
saved. Another layout: they match the one-process reference within the layout tolerance of
test_layouts.py (1e-4), which needs weights *and* Adam state (step 4) resharded correctly.
"""

from __future__ import annotations

import pytest

from tests.conftest import train_layouts

pytestmark = pytest.mark.multiprocess


def resumed_matches(run: dict, reference: dict, layout: str) -> None:
    assert len(run["loss"]) == 2, f"{layout} should train steps 3 and 4 only"
    assert run["loss"] == pytest.approx(reference["loss"][2:], abs=1e-4), f"{layout} resumed losses differ"
    assert run["grad_norm"] == pytest.approx(reference["grad_norm"][2:], rel=1e-4), f"{layout} grad norms differ"


def test_tp2_pp2_reshards_to_tp1_and_pp2(tmp_path, references):
    """Optimizer state saved in the fully reshardable format follows the weights to any layout."""
    saved = "tp2_pp2_fullyreshardable"
    runs = train_layouts(
        tmp_path,
        4,
        "dense",
        [saved, f"tp1@{saved}", f"tp1_pp2@{saved}", f"{saved}@{saved}"],
        extra=["--save-dir", str(tmp_path / "ckpt")],
    )
    assert runs[f"{saved}@{saved}"]["loss"] == runs[saved]["loss"][2:]  # exact resume
    for layout in (f"tp1@{saved}", f"tp1_pp2@{saved}"):
        resumed_matches(runs[layout], references["dense"], layout)


def test_dp2_resumes_and_reshards_over_data_parallel(tmp_path, references):
    """The default (dp_reshardable) optimizer state: exact resume, DP2 -> DP1, and a clear refusal
    under another TP size (weights still load with no_load_optim)."""
    save = ["--save-dir", str(tmp_path / "ckpt")]
    runs = train_layouts(tmp_path, 2, "dense", ["dp2", "dp2@dp2", "tp2_noloadoptim@dp2"], extra=save)
    assert runs["dp2@dp2"]["loss"] == runs["dp2"]["loss"][2:]  # exact resume, optimizer sharded over DP
    best = sorted(p.name for p in (tmp_path / "ckpt" / "dp2-best").iterdir())
    assert len(best) == 1 and best[0].endswith(".ckpt")  # save_top_k=1 deleted the other three
    assert runs["tp2_noloadoptim@dp2"]["loss"][0] == pytest.approx(references["dense"]["loss"][2], abs=1e-4)
    one_rank = train_layouts(tmp_path, 1, "dense", ["tp1@dp2"], extra=save)
    resumed_matches(one_rank["tp1@dp2"], references["dense"], "tp1@dp2")
    with pytest.raises(pytest.fail.Exception, match="optim_format='fully_reshardable'"):
        train_layouts(tmp_path, 2, "dense", ["tp2@dp2"], extra=save)


def test_moe_ep2_reshards_to_ep1(tmp_path, references):
    """Megatron-Core chains separate dense and expert optimizers under EP2 but not under EP1 and
    cannot map one onto the other: the optimizer state is refused with a clear error (below), and
    the weights reshard: the first step after loading matches the reference."""
    save = ["--save-dir", str(tmp_path / "ckpt")]
    runs = train_layouts(tmp_path, 2, "moe", ["ep2", "ep2@ep2", "dp2_noloadoptim@ep2"], extra=save)
    assert runs["ep2@ep2"]["loss"] == runs["ep2"]["loss"][2:]  # exact resume under EP2
    resumed = runs["dp2_noloadoptim@ep2"]["loss"]
    assert resumed[0] == pytest.approx(references["moe"]["loss"][2], abs=1e-4)
    with pytest.raises(pytest.fail.Exception, match="cannot reshard between them"):
        train_layouts(tmp_path, 2, "moe", ["dp2@ep2"], extra=save)
