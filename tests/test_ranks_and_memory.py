"""Rank helpers and the rank-aware logger on 2 CPU ranks, and the plan's weights/grads/optimizer
estimate against the bytes of the tensors a real 2-rank job holds."""

from __future__ import annotations

import json

import pytest

from lightning_megatron import GPTConfig
from lightning_megatron.data.text import ByteTokenizer
from lightning_megatron.plan import Layout, estimate
from tests.conftest import SCRIPTS, run_job

pytestmark = pytest.mark.multiprocess
# The script runs one microbatch per step (the DP-local batch): tp2 (with sp) and pp2 have dp=1.
LAYOUTS = {
    "tp2": Layout(tp=2, micro_batch_size=4),
    "pp2": Layout(pp=2, micro_batch_size=4),
    "dp2": Layout(micro_batch_size=2),
}
CONFIG = GPTConfig(
    vocab_size=ByteTokenizer.vocab_size,
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run_job([str(SCRIPTS / "ranks_and_memory.py"), "--layouts", *LAYOUTS, "--out", str(out)], cwd=out)
    return {(layout, r): json.loads((out / f"{layout}-rank{r}.json").read_text()) for layout in LAYOUTS for r in (0, 1)}


@pytest.mark.parametrize(
    "layout, sizes, ranks",
    [
        ("tp2", dict(tp=2, pp=1, dp=1), [dict(tp=0), dict(tp=1)]),
        ("pp2", dict(tp=1, pp=2, dp=1), [dict(pp=0), dict(pp=1)]),
        ("dp2", dict(tp=1, pp=1, dp=2), [dict(dp=0), dict(dp=1)]),
    ],
)
def test_rank_helpers(measured, layout, sizes, ranks):
    for r in (0, 1):
        got = measured[layout, r]
        assert got["sizes"] == dict(sizes, cp=1, ep=1)
        assert {k: got["ranks"][k] for k in ranks[r]} == ranks[r]
        assert got["tp_group_size"] == sizes["tp"] and got["dp_group_size"] == sizes["dp"]
        name, index = next(iter(ranks[r].items()))
        assert got["prefix"] == f"[rank {r} {name}{index}]"


def test_rank_logger_rank_0_and_all_ranks(measured):
    assert measured["tp2", 0]["messages"] == ["[rank 0 tp0] once", "[rank 0 tp0] everyone"]
    assert measured["tp2", 1]["messages"] == ["[rank 1 tp1] everyone"]


def test_rank_helpers_need_the_parallel_state():
    from megatron.core import parallel_state as ps

    from lightning_megatron import parallel

    if ps.model_parallel_is_initialized():
        pytest.skip("an earlier in-process test left Megatron's parallel state set up")
    with pytest.raises(RuntimeError, match="after MegatronStrategy has set up"):
        parallel.tp_size()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_matches_the_tensors_of_a_built_model(measured, layout):
    """bf16-mixed: 2-byte weights exactly; fp32 gradient buffers up to Megatron's bucket padding;
    12 bytes of optimizer state per parameter summed over the data-parallel ranks exactly (each
    rank's shard within 2% of an even split); the tensors autograd keeps for backward within 5%
    of the activation estimate (rotary tables, norm statistics and labels are not modelled)."""
    candidate = estimate(CONFIG, LAYOUTS[layout], world_size=2, seq_length=32, global_batch_size=4)
    for r in (0, 1):
        got = measured[layout, r]
        stage = candidate.stages[got["ranks"]["pp"]]
        assert got["params"] == stage.params
        assert got["weights"] == stage.weights
        assert stage.grads <= got["grads"] <= stage.grads * 1.02
        assert got["optimizer"] == pytest.approx(stage.optimizer, rel=0.02)
        assert got["activations"] == pytest.approx(stage.activations - stage.transient, rel=0.05)
    if candidate.dp == 2:
        assert measured[layout, 0]["optimizer"] + measured[layout, 1]["optimizer"] == 12 * stage.params


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_estimate_under_recompute(recompute):
    """One process, the strategy configured with the layout's own recompute_config()."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_megatron import GPTModule, MegatronStrategy
    from lightning_megatron.data.text import TokenBlocks, bundled_corpus
    from tests.scripts.ranks_and_memory import SavedActivations

    layout = Layout(micro_batch_size=4, recompute=recompute)
    saved = SavedActivations()
    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=4, recompute=layout.recompute_config(CONFIG)),
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saved],
    )
    data = TokenBlocks.from_text(bundled_corpus()[:10000], ByteTokenizer(), 64)
    trainer.fit(GPTModule(CONFIG), DataLoader(data, batch_size=4))
    memory = estimate(CONFIG, layout, world_size=1, seq_length=64, global_batch_size=4).memory
    assert saved.bytes == pytest.approx(memory.activations - memory.transient, rel=0.05)
