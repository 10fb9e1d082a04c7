"""Freeze: frozen parameters do not change and get no optimizer state; exceptions stay trainable."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.callbacks import Freeze
from lightning_megatron.callbacks.freeze import _global_names
from tests.test_training import CONFIG, loader


def fit_with(freeze: Freeze):
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=1e-2)
    before, trained = {}, {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            before.update({n: p.detach().clone() for n, p in _global_names(trainer.strategy._bare_chunks)})
            optimizer = trainer.strategy.optimizers[0].megatron
            trained["optimizer_params"] = sum(
                p.numel()
                for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                for group in opt.optimizer.param_groups
                for p in group["params"]
            )

    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=2),
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[freeze, Snapshot()],
        limit_val_batches=0,
    )
    trainer.fit(model, loader())
    after = {n: p.detach() for n, p in _global_names(model.chunks)}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return changed, set(before), trainable, trained["optimizer_params"]


def test_freeze_by_prefix():
    changed, names, trainable, optimizer_params = fit_with(Freeze(parameters=["embedding", "decoder.layers.0."]))
    frozen = {n for n in names if n.startswith(("embedding", "decoder.layers.0."))}
    assert frozen and not (changed & frozen)
    assert changed == names - frozen
    assert optimizer_params == trainable  # Adam state only for trainable parameters (fp32: the params themselves)


def test_freeze_ratio_with_trainable_exception():
    changed, names, _, _ = fit_with(Freeze(freeze_ratio=0.5, trainable_regex=r"layers\.0\.self_attention\.linear_proj"))
    assert "decoder.layers.0.self_attention.linear_proj.weight" in changed
    assert not any(n.startswith(("embedding", "decoder.layers.0.mlp")) for n in changed)
    assert any(n.startswith("decoder.layers.1.") for n in changed)


def test_freezing_everything_is_refused():
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit_with(Freeze(regex=".*"))


@pytest.mark.multiprocess
def test_freeze_under_pipeline_parallelism_uses_global_layer_names(tmp_path):
    import json

    from tests.conftest import SCRIPTS, run_job

    run_job([str(SCRIPTS / "freeze_pp.py"), str(tmp_path)], cwd=tmp_path)
    first, last = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Stage 0 holds the embedding and layers 0-1; stage 1 holds layers 2-3 (global numbers).
    assert any(n.startswith("decoder.layers.1.") for n in first["names"])
    assert any(n.startswith("decoder.layers.3.") for n in last["names"])
    assert not any(n.startswith(("embedding", "decoder.layers.3.")) for n in first["changed"] + last["changed"])
    assert any(n.startswith("decoder.layers.2.") for n in last["changed"])
    assert any(n.startswith("decoder.layers.0.") for n in first["changed"])
