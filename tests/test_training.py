"""Single-process training behaviour: learning, validate/predict, a second fit, optimizers, precision."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core.optimizer import OptimizerConfig
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy, RecomputeConfig
from lightning_megatron.data.text import ByteTokenizer, TokenBlocks, bundled_corpus

CONFIG = dict(
    vocab_size=257,
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    tie_word_embeddings=False,
)


def loader(seq_length=32, batch_size=4, chars=20000):
    data = TokenBlocks.from_text(bundled_corpus()[:chars], ByteTokenizer(), seq_length)
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def trainer(**kwargs):
    defaults = dict(
        strategy=MegatronStrategy(micro_batch_size=2),
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_loss_falls_on_bundled_corpus():
    losses = Losses()
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=3e-3)
    trainer(max_steps=40, callbacks=[losses]).fit(model, loader(batch_size=8, chars=100000))
    first, last = sum(losses.values[:5]) / 5, sum(losses.values[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_validate_predict_and_second_fit_in_one_process():
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG))
    data = loader()
    t = trainer(val_check_interval=3)
    t.fit(model, data, data)
    assert "val/loss" in t.callback_metrics and "val/ppl" in t.callback_metrics
    # validate and predict reuse the trained module (new setup, same weights).
    metrics = trainer().validate(model, data)
    assert metrics[0]["val/loss"] == pytest.approx(float(t.callback_metrics["val/loss"]), rel=1e-5)
    logits = trainer(limit_predict_batches=1).predict(model, data)
    assert logits[0].shape == (4, 32, GPTConfig.preset("qwen2", **CONFIG).padded_vocab_size())
    # A second fit in the same process (as in a notebook) continues training.
    losses = Losses()
    trainer(callbacks=[losses]).fit(model, data)
    assert len(losses.values) == 3 and all(torch.isfinite(torch.tensor(losses.values)))
    # On gloo every fit creates Megatron's groups and its teardown destroys them (NCCL keeps them
    # for the next fit with the same layout: tests/test_gpu.py).
    assert not ps.model_parallel_is_initialized()


class ReturnsOptimizer(GPTModule):
    def __init__(self, make, **kw):
        super().__init__(GPTConfig.preset("qwen2", **CONFIG), **kw)
        self.make = make

    def configure_optimizers(self):
        return self.make(self)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1),
        lambda m: OptimizerConfig(optimizer="adam", lr=1e-3),
        lambda m: {
            "optimizer": OptimizerConfig(optimizer="adam", lr=1e-3),
            "lr_scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
        },
    ],
    ids=["sgd", "adamw", "megatron-config", "megatron-config-with-scheduler"],
)
def test_configure_optimizers_variants(make, request):
    losses = Losses()
    # Megatron's distributed optimizer is Adam-only; SGD runs with the plain one.
    sgd = "sgd" in request.node.name
    t = trainer(callbacks=[losses], strategy=MegatronStrategy(micro_batch_size=2, use_distributed_optimizer=not sgd))
    t.fit(ReturnsOptimizer(make), loader())
    assert len(losses.values) == 3 and losses.values[-1] < losses.values[0]


def test_torch_scheduler_drives_megatron_learning_rate():
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            optimizer = trainer.strategy.optimizers[0]
            seen.append({g["lr"] for g in optimizer.megatron.param_groups})

    def make(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer(callbacks=[Watch()]).fit(ReturnsOptimizer(make), loader())
    # Megatron's groups used lr 1e-3, 5e-4, 3.3e-4 at steps 0, 1, 2.
    assert [s.pop() for s in seen] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=0.1), ValueError, "use torch.optim.AdamW"),
        (lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3), TypeError, "can carry over torch.optim.AdamW"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), ValueError, "distributed optimizer supports Adam only"),
    ],
)
def test_unsupported_optimizers_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        trainer().fit(ReturnsOptimizer(make), loader())


def test_accumulate_grad_batches_is_refused():
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG))
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer(accumulate_grad_batches=2).fit(model, loader())


def test_batch_not_divisible_by_micro_batch_is_refused():
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG))
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=2"):
        trainer().fit(model, loader(batch_size=3))


def test_trainer_gradient_clipping_reaches_megatron():
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(trainer.strategy.optimizers[0].megatron.config.clip_grad)

    trainer(gradient_clip_val=0.25, max_steps=1, callbacks=[Watch()]).fit(
        GPTModule(GPTConfig.preset("qwen2", **CONFIG)), loader()
    )
    assert seen == [0.25]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_with_fp32_master_weights(precision):
    losses = Losses()
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=3e-3)
    trainer(precision=precision, max_steps=6, callbacks=[losses]).fit(model, loader())
    assert all(torch.isfinite(torch.tensor(losses.values))) and losses.values[-1] < losses.values[0]
    assert next(model.chunks[0].parameters()).dtype == torch.bfloat16


def test_padding_and_loss_mask_exclude_tokens():
    """Tokens masked by attention_mask/labels=-100 contribute nothing to the loss."""
    from lightning_megatron.models.gpt import prepare_inputs

    ids = torch.arange(8).view(1, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 6:] = 0
    inputs = prepare_inputs({"input_ids": ids, "labels": labels, "attention_mask": mask})
    # Position t predicts label t+1: targets 3..5 are real; 6, 7 are padding; the last has none.
    assert inputs["loss_mask"].tolist() == [[False, False, True, True, True, False, False, False]]
    assert inputs["attention_mask"].shape == (1, 1, 8, 8)


def test_a_batch_without_target_tokens_trains_nothing():
    """Every label masked: the global token count is 0, so the gradients are scaled by 1 (not
    divided by 0; the division happens on the device, see schedule.finalize_grads): the loss
    is 0, the gradient norm 0, nothing is NaN."""

    class GradNorms(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append(trainer.strategy.optimizers[0].last_grad_norm)

    ids = torch.randint(0, CONFIG["vocab_size"], (8, 32))
    rows = [{"input_ids": row, "labels": torch.full_like(row, -100)} for row in ids]
    losses, norms = Losses(), GradNorms()
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=1e-3)
    trainer(max_steps=2, callbacks=[losses, norms]).fit(model, DataLoader(rows, batch_size=4))
    assert losses.values == [0.0, 0.0] and norms.values == [0.0, 0.0]


def test_fp16_uses_dynamic_loss_scaling():
    # Lightning turns "16-mixed" into bf16 on CPU; passing the plugin keeps fp16 (CPU has fp16 kernels).
    from lightning_megatron import MegatronPrecision

    scales, skipped, losses = [], [], Losses()

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            optimizer = trainer.strategy.optimizers[0]
            scales.append(float(optimizer.megatron.get_loss_scale()))
            skipped.append(optimizer.last_step_skipped)

    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=3e-3)
    trainer(plugins=[MegatronPrecision("16-mixed")], max_steps=10, callbacks=[losses, Watch()]).fit(model, loader())
    assert next(model.chunks[0].parameters()).dtype == torch.float16
    # The loss is a token sum (Megatron's per-token loss), so 2**16 overflows at first: those
    # steps are skipped and the scale halves until the gradients fit in fp16.
    assert scales[0] == 2.0**16 and skipped[0]
    assert scales[-1] < scales[0] and not skipped[-1]
    assert all(torch.isfinite(torch.tensor(losses.values))) and losses.values[-1] < losses.values[0] - 0.1


@pytest.mark.parametrize(
    "recompute, module_name, calls_per_microbatch",
    [
        (RecomputeConfig("full", "uniform", 1), "TransformerLayer", 2),
        (RecomputeConfig("full", "block", 1), "TransformerLayer", 1.5),  # 1 of the 2 layers recomputed
        (RecomputeConfig("selective", modules=["core_attn"]), "SDPAttention", 2),
    ],
    ids=["full-uniform", "full-block", "selective-core-attn"],
)
def test_recompute_reruns_forward_and_keeps_losses(recompute, module_name, calls_per_microbatch):
    def run(recompute):
        losses, calls = Losses(), []

        class Count(L.Callback):
            def on_train_start(self, trainer, module):
                for m in module.chunks[0].modules():
                    if type(m).__name__ == module_name:
                        m.register_forward_hook(lambda *a: calls.append(1))

        model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=3e-3)
        trainer(
            strategy=MegatronStrategy(micro_batch_size=2, recompute=recompute), max_steps=2, callbacks=[losses, Count()]
        ).fit(model, loader())
        return losses.values, len(calls)

    plain_losses, plain_calls = run(None)
    losses, calls = run(recompute)
    assert losses == plain_losses  # recompute replays the same math (no dropout here)
    assert calls == plain_calls * calls_per_microbatch
