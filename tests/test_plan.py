"""`plan`: hand-computed memory for a tiny model, reasons for invalid layouts, ordering, the CLI."""

from __future__ import annotations

import json
import re

import pytest

from lightning_megatron import GPTConfig
from lightning_megatron.plan import (
    Layout,
    estimate,
    layer_activation_bytes,
    layer_params,
    logits_bytes,
    main,
    parse_layout,
    plan,
    stage_params,
)

# head_dim 16: q = 4*16 = 64, kv = 2*16 = 32; vocab 256 is already a multiple of 128.
TINY = GPTConfig(
    vocab_size=256, num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128
)
MOE = GPTConfig(vocab_size=256, num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, num_experts=4)


def test_parameter_counts_by_hand():
    # norms 2*64, qkv 64*(64+2*32), proj 64*64, SwiGLU 3*64*128
    assert layer_params(TINY, tp=1) == (64 + 64 + 8192 + 4096 + 24576, 0)
    assert layer_params(TINY, tp=2) == (128 + 4096 + 2048 + 12288, 0)  # norms are replicated
    embedding = 256 * 64
    assert stage_params(TINY, tp=1, pp=1, stage=0) == (4 * 36992 + 2 * embedding + 64, 0)
    assert stage_params(TINY, tp=1, pp=2, stage=0) == (2 * 36992 + embedding, 0)
    assert stage_params(TINY, tp=1, pp=2, stage=1) == (2 * 36992 + embedding + 64, 0)  # + final norm
    # MoE: router 4*64 replicated, 4 experts of 3*64*128, split over ep.
    dense, expert = layer_params(MOE, tp=1, ep=2)
    assert (dense, expert) == (64 + 64 + 64 * 192 + 64 * 64 + 4 * 64, 2 * 3 * 64 * 128)


def test_activation_bytes_by_hand():
    # bf16 (e=2), s=32, mbs=1, per token: norms 2*8*h, their outputs (linear inputs) 2*e*h,
    # attention e*(2q + 2kv) + fp32 log-sum-exp 4*heads, SwiGLU MLP e*5f
    per_token = 2 * 8 * 64 + 2 * 2 * 64 + 2 * (2 * 64 + 2 * 32) + 4 * 4 + 2 * 5 * 128
    assert per_token == 2960
    assert layer_activation_bytes(TINY, Layout(), 32, 2) == 32 * per_token
    # tp=2 turns on sequence parallelism: everything halves.
    assert layer_activation_bytes(TINY, Layout(tp=2), 32, 2) == 32 * per_token // 2
    assert layer_activation_bytes(TINY, Layout(micro_batch_size=2), 32, 2) == 2 * 32 * per_token
    assert layer_activation_bytes(TINY, Layout(recompute="selective"), 32, 2) == 32 * (per_token - 2 * 5 * 128)
    assert layer_activation_bytes(TINY, Layout(recompute="full"), 32, 2) == 32 * 2 * 64  # the layer input
    # final norm (8h), output-layer input (e*h), the bf16 logits and 12 bytes a token for the
    # cross entropy; the logits' gradient is transient
    assert logits_bytes(TINY, Layout(), 32, 2) == (32 * (10 * 64 + 2 * 256 + 12), 32 * 256 * 2)


def test_pipeline_stage_memory_by_hand():
    # 2 GPUs, pp=2, dp=1, global batch 4 of mbs 1: 4 microbatches; 1F1B keeps 2 in flight on stage 0.
    candidate = estimate(TINY, Layout(pp=2), world_size=2, seq_length=32, global_batch_size=4)
    first, last = candidate.stages
    assert (first.microbatches_in_flight, last.microbatches_in_flight) == (2, 1)
    params0 = 2 * 36992 + 256 * 64
    assert (first.weights, first.grads, first.optimizer) == (2 * params0, 4 * params0, 12 * params0)
    layer = 32 * 2960
    assert (first.activations, first.transient) == (2 * 2 * layer, 0)
    assert (last.activations, last.transient) == (2 * layer + 32 * 1164 + 32 * 512, 32 * 512)
    # The optimizer step's fp32 temporary (after the activations are freed) vs the activations.
    assert first.optimizer_step == 4 * params0
    assert first.total == 18 * params0 + max(first.activations, first.optimizer_step)
    assert candidate.memory is first and candidate.valid


def test_recompute_adds_one_layer_back_while_backward_runs():
    full = estimate(TINY, Layout(recompute="full"), 1, 32, 1).memory
    layer = 32 * 2960
    assert full.transient == layer - 32 * 2 * 64 + 32 * 512  # one layer recomputed + the logits' gradient
    assert full.activations == 4 * 32 * 2 * 64 + 32 * 1164 + full.transient


def test_distributed_optimizer_shards_over_data_parallel():
    sharded = estimate(TINY, Layout(), world_size=4, seq_length=32, global_batch_size=8).memory
    whole = estimate(TINY, Layout(), 4, 32, 8, distributed_optimizer=False).memory
    assert whole.optimizer == 12 * whole.params and sharded.optimizer == 12 * whole.params // 4
    fp32 = estimate(TINY, Layout(), 4, 32, 8, precision="32-true").memory
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * fp32.params, 4 * fp32.params, 8 * fp32.params // 4)


@pytest.mark.parametrize(
    "config, layout, world, message",
    [
        (TINY, Layout(tp=8), 8, r"tp=8 does not divide num_attention_heads=4"),
        (TINY, Layout(tp=4), 4, r"tp=4 does not divide num_query_groups=2; choose tp in \[1, 2\]"),
        (TINY, Layout(pp=3), 3, r"pp=3 does not divide num_layers=4"),
        (TINY, Layout(tp=3), 4, r"does not divide the world size 4"),
        (MOE, Layout(ep=3), 3, r"ep=3 does not divide num_experts=4"),
        (TINY, Layout(ep=2), 2, r"ep=2 needs an MoE model"),
        (TINY, Layout(cp=2), 2, r"cp=2 needs Transformer Engine"),
        (TINY, Layout(micro_batch_size=4), 2, r"global_batch_size=4 is not a multiple of dp\*micro_batch_size=2\*4"),
    ],
)
def test_invalid_layouts_say_why(config, layout, world, message):
    candidate = estimate(config, layout, world, seq_length=32, global_batch_size=4)
    assert not candidate.valid and candidate.memory is None
    assert re.search(message, candidate.reason), candidate.reason


def test_over_budget_is_invalid_with_the_numbers():
    candidate = estimate(TINY, Layout(), 1, 32, 4, gpu_memory_gib=2.001, reserve_gib=2.0)
    assert not candidate.valid and "over the 0.001 GiB budget" in candidate.reason
    assert estimate(TINY, Layout(), 1, 32, 4, gpu_memory_gib=3, reserve_gib=2.0).valid


def test_plan_orders_valid_layouts_and_keeps_the_invalid_ones():
    candidates = plan(TINY, num_gpus=4, gpu_memory_gib=8, seq_length=32, global_batch_size=8)
    valid = [c for c in candidates if c.valid]
    assert candidates[: len(valid)] == valid  # valid first
    best = valid[0].layout
    assert (best.tp, best.pp, best.micro_batch_size, best.recompute) == (1, 1, 2, "none")
    assert {c.layout.tp for c in valid} == {1, 2}  # tp=4 cannot split 2 query groups
    assert all(c.reason for c in candidates[len(valid) :])
    # More recompute never needs more memory.
    by_recompute = {
        c.layout.recompute: c.memory.total for c in valid if c.layout == Layout(1, 1, 1, 1, 1, c.layout.recompute)
    }
    assert by_recompute["full"] < by_recompute["selective"] < by_recompute["none"]


def test_memory_budget_pushes_towards_model_parallel_and_recompute():
    # Budget below the tp1 pp1 estimate: only split or recomputing layouts remain.
    single = estimate(TINY, Layout(), 2, 1024, 2).memory.total
    candidates = plan(TINY, 2, gpu_memory_gib=2 + single / 2**30 * 0.9, seq_length=1024, global_batch_size=2)
    valid = [c.layout for c in candidates if c.valid]
    assert valid and Layout() not in valid
    assert all(lay.tp * lay.pp > 1 or lay.recompute != "none" for lay in valid)


def test_parse_layout():
    assert parse_layout("tp=2,pp=2,mbs=4,recompute=full") == Layout(tp=2, pp=2, micro_batch_size=4, recompute="full")
    with pytest.raises(ValueError, match="bad layout item 'tq=2'"):
        parse_layout("tq=2")


def test_cli_prints_one_layout_as_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="llama",
                vocab_size=256,
                num_hidden_layers=4,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
            )
        )
    )
    args = ["--model", str(tmp_path), "--gpus", "2", "--gpu-memory", "80", "--seq-length", "32"]
    assert main([*args, "--global-batch-size", "4", "--layout", "pp=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and out["pp"] == 2 and out["dp"] == 1 and len(out["stages"]) == 2
    assert out["peak"]["params"] == 2 * 36992 + 256 * 64
    assert main([*args, "--global-batch-size", "4", "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "valid layouts" in table and "\n  1   1   1   1    2    2      none" in table, table
    with pytest.raises(ValueError, match="'nope' is neither a preset"):
        main(["--model", "nope", *args[2:], "--global-batch-size", "4"])


def test_lightning_megatron_plan_command(capsys):
    from lightning_megatron.cli import main as cli

    args = ["plan", "--model", "qwen2", "--gpus", "8", "--gpu-memory", "80", "--seq-length", "4096"]
    assert cli([*args, "--global-batch-size", "64", "--layout", "tp=2,pp=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dp"] == 2 and out["peak"]["total_bytes"] == sum(
        out["peak"][f"{k}_bytes"] for k in ("weights", "grads", "optimizer", "activations")
    )
    # tp=4 cannot split Qwen2-0.5B's 14 heads: the layout is refused with the reason, exit code 1.
    assert cli([*args, "--global-batch-size", "64", "--layout", "tp=4"]) == 1
    assert "tp=4 does not divide num_attention_heads=14" in json.loads(capsys.readouterr().out)["reason"]
