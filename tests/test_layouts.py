"""The same model, seed, data and global batch give the same losses under every parallel layout.

Reference: one process. Each other layout trains 4 AdamW steps on the same 8-sample global batches.
Tolerance: fp32 on CPU; layouts differ only in the order of floating-point reductions. Most
layouts agree to ~1e-6; under TP the different summation order is amplified by training
(we saw 4e-5 on step 3 at lr 1e-2), so losses must agree to 1e-4 (abs) and grad norms to 1e-4 (rel).
The grad norm is compared too: Adam's update is nearly invariant to gradient scale, so a layout
with wrongly scaled gradients could still match losses; the norm catches it.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import assert_same_run, train_layouts

pytestmark = pytest.mark.multiprocess


def test_reference_run_learns(references):
    for model, run in references.items():
        assert run["loss"][-1] < run["loss"][0] - 0.5, model


def test_dense_two_ranks(tmp_path, references):
    layouts = ["dp2", "tp2", "pp2", "pp2_vpp2", "tp2_sp", "pp2_mbs2", "dp2_overlap"]
    runs = train_layouts(tmp_path, 2, "dense", layouts, extra=["--predict"])
    for layout in layouts:
        assert_same_run(runs[layout], references["dense"], layout)


def test_dense_four_ranks(tmp_path, references):
    layouts = ["tp2_pp2", "tp2_pp2_vpp2", "tp2_dp2_sp"]
    runs = train_layouts(tmp_path, 4, "dense", layouts)
    for layout in layouts:
        assert_same_run(runs[layout], references["dense"], layout)


def test_tied_embeddings_and_qk_norm(tmp_path, references):
    layouts = ["tp2", "pp2"]
    runs = train_layouts(tmp_path, 2, "tied", layouts)
    for layout in layouts:
        assert_same_run(runs[layout], references["tied"], layout)


def test_moe_layouts(tmp_path, references):
    layouts = ["dp2", "ep2", "tp2_ep2_etp1_sp", "pp2"]
    runs = train_layouts(tmp_path, 2, "moe", layouts)
    for layout in layouts:
        assert_same_run(runs[layout], references["moe"], layout)


def test_torchrun_launch(tmp_path, references):
    """torchrun starts the ranks itself; Lightning picks up its environment."""
    runs = train_layouts(
        tmp_path,
        2,
        "dense",
        ["tp2"],
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    assert_same_run(runs["tp2"], references["dense"], "tp2 via torchrun")


def test_fork_launch(tmp_path, references):
    """start_method='fork', as in a notebook: the ranks are forked from the calling process."""
    runs = train_layouts(tmp_path, 2, "dense", ["pp2"], extra=["--start-method", "fork"])
    assert_same_run(runs["pp2"], references["dense"], "pp2 forked")


def test_slurm_launch(tmp_path, references):
    """Ranks started as srun starts them: Lightning's SLURMEnvironment gives rank and world size."""
    runs = train_layouts(tmp_path, 2, "dense", ["tp2"], srun=True)
    assert_same_run(runs["tp2"], references["dense"], "tp2 under SLURM")
