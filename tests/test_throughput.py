"""ThroughputMonitor: its FLOP count against a counted model, and its numbers against an
independent clock and token count on CPU; the metrics reach the logger and the progress bar."""

from __future__ import annotations

import csv
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_megatron import GPTConfig, GPTModule
from lightning_megatron.callbacks import ThroughputMonitor, model_flops_per_token
from tests.test_training import CONFIG, loader, trainer


def test_flops_per_token_match_a_flop_counter():
    """Count the matmul FLOPs of forward + backward of a transformers Llama of the same shape
    (eager attention: full s x s scores, as the formula counts them)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from lightning_megatron.hf import hf_config

    config = GPTConfig.preset("llama", **CONFIG)
    hf = AutoModelForCausalLM.from_config(hf_config(config, torch.float32), attn_implementation="eager")
    batch, seq = 2, 64
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        hf(ids, labels=ids).loss.backward()
    # The rotary embedding's tiny position matmul is the only extra FLOPs the counter sees.
    assert counter.get_total_flops() == pytest.approx(model_flops_per_token(config, seq) * batch * seq, rel=1e-3)


class Clock(L.Callback):
    """An independent clock: batch end times, and time spent in validation inside fit."""

    def __init__(self):
        self.starts, self.ends, self.validation = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def on_validation_start(self, trainer, module):
        self._val = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        time.sleep(0.2)  # a slow validation: it must not count as training time

    def on_validation_end(self, trainer, module):
        self.validation.append((self._val, time.perf_counter()))


def test_numbers_agree_with_measured_step_times_and_token_counts(tmp_path):
    seq, batch, window, peak = 32, 4, 2, 0.5
    clock, monitor = Clock(), ThroughputMonitor(peak_tflops=peak, window=window)
    config = GPTConfig.preset("qwen2", **CONFIG)
    run = trainer(
        max_steps=6,
        callbacks=[clock, monitor],  # the clock's hooks run first
        logger=CSVLogger(tmp_path, name="perf"),
        log_every_n_steps=1,
        val_check_interval=3,
        limit_val_batches=2,
    )
    run.fit(GPTModule(config), loader(seq, batch), loader(seq, batch))
    assert len(monitor.history) == 3 and len(clock.validation) == 2
    tokens = window * batch * seq  # one data-parallel rank
    window_starts = [clock.starts[0], clock.ends[1], clock.ends[3]]
    for i, metrics in enumerate(monitor.history):
        begin, end = window_starts[i], clock.ends[2 * i + 1]
        paused = sum(b - a for a, b in clock.validation if begin < a < end)
        elapsed = end - begin - paused
        assert (i, paused > 0.3) in [(0, False), (1, True), (2, False)]  # validation ran after step 3
        # Two clocks read in neighbouring hooks: close, not equal (the slack is scheduling noise on a
        # loaded CI machine; miscounting tokens or timing validation would be off by 2x or more).
        assert metrics["perf/tokens_per_sec"] == pytest.approx(tokens / elapsed, rel=0.2)
        assert metrics["perf/samples_per_sec"] == pytest.approx(metrics["perf/tokens_per_sec"] / seq, rel=1e-9)
        assert metrics["perf/step_time"] == pytest.approx(elapsed / window, rel=0.2)
        tflops = model_flops_per_token(config, seq) * metrics["perf/tokens_per_sec"] / 1e12
        assert metrics["perf/tflops_per_device"] == pytest.approx(tflops, rel=1e-9)
        assert metrics["perf/mfu"] == pytest.approx(tflops / peak, rel=1e-9)
    # The latest window reaches the logger and the progress bar.
    assert set(run.progress_bar_metrics) >= {"perf/tokens_per_sec", "perf/mfu"}
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [float(row["perf/tokens_per_sec"]) for row in csv.DictReader(f) if row.get("perf/tokens_per_sec")]
    assert logged[-1] == pytest.approx(monitor.history[-1]["perf/tokens_per_sec"])
    windows = [m["perf/tokens_per_sec"] for m in monitor.history]
    assert sorted(set(logged)) == pytest.approx(sorted(windows), rel=1e-6)  # logged as float32


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        ThroughputMonitor(window=0)
