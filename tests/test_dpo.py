"""DPO against a straightforward reference written with transformers + peft on the same weights.

The job script (tests/scripts/dpo_layouts.py) trains LoRA adapters (random A and B, so the
policy differs from the reference from the start) with DPO, the reference being the base model
(adapters off). Here the same pairs go through the peft model, the loss is written out from the
papers' formulas, and the loss, every logged metric and the adapter gradients must match.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.callbacks import DPO, LoRA
from lightning_megatron.dpo import DPOConfig, pairs_to_rows
from lightning_megatron.hf import export_peft
from tests.conftest import SCRIPTS, run_job
from tests.hf_models import make_hf_model
from tests.scripts.dpo_layouts import OPTIONS, preference_pairs
from tests.test_lora import assert_same_adapter_grads, peft_model

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_hf_model("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")


def run_dpo(hf, out, devices: int, layout: str, loss_types: list[str]) -> dict:
    run_job(
        [str(SCRIPTS / "dpo_layouts.py"), "--hf", str(hf), "--devices", str(devices), "--layout", layout]
        + ["--out", str(out), "--loss-types", *loss_types],
        cwd=out.parent,
    )
    return {
        t: [{k.removeprefix("train/"): v for k, v in m.items()} for m in torch.load(out / t / "result.pt")["metrics"]]
        for t in loss_types
    }


def response_logps(model, pairs, side: str):
    ids, labels = pairs[f"{side}_input_ids"], pairs[f"{side}_labels"]
    logits = model(input_ids=ids, attention_mask=pairs[f"{side}_attention_mask"]).logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * valid).sum(-1), valid.sum(-1)


def reference_dpo(model, pairs, loss_type: str, beta: float, label_smoothing=0.0, rpo_alpha=None):
    """The DPO/IPO/SLiC/robust losses as published (and as TRL computes them), on a peft model
    whose base, adapters disabled, is the reference."""
    chosen, n_chosen = response_logps(model, pairs, "chosen")
    rejected, n_rejected = response_logps(model, pairs, "rejected")
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, _ = response_logps(model, pairs, "chosen")
        ref_rejected, _ = response_logps(model, pairs, "rejected")
    nll = -chosen / n_chosen
    if loss_type == "ipo":
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * nll
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    metrics = {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
    }
    if rpo_alpha is not None:
        metrics["nll"] = nll.mean().item()
    return losses.mean(), metrics


@pytest.fixture(scope="module")
def tp1(qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "tp1"
    return out, run_dpo(qwen2, out, 1, "tp1", list(OPTIONS))


@pytest.mark.parametrize("loss_type", list(OPTIONS))
def test_loss_metrics_and_gradients_match_the_reference(qwen2, tp1, loss_type):
    out, runs = tp1
    export_peft(out / loss_type / "init", out / loss_type / "peft_init", progress=False)
    export_peft(out / loss_type / "grads", out / loss_type / "peft_grads", progress=False)
    model = peft_model(qwen2, out / loss_type / "peft_init", trainable=True)
    loss, expected = reference_dpo(model, preference_pairs(), loss_type, **OPTIONS[loss_type])
    ours = runs[loss_type][0]
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    loss.backward()
    assert_same_adapter_grads(out / loss_type / "peft_grads", model)
    # And training moves the policy towards the chosen answers.
    assert runs[loss_type][-1]["rewards/margins"] > ours["rewards/margins"]


def test_tp2_and_pp2_give_the_tp1_losses(qwen2, tp1, tmp_path):
    reference = tp1[1]["sigmoid"]
    for devices, layout in [(2, "tp2_sp"), (2, "pp2")]:
        run = run_dpo(qwen2, tmp_path / layout, devices, layout, ["sigmoid"])["sigmoid"]
        for ours, expected in zip(run, reference, strict=True):
            assert ours["loss"] == pytest.approx(expected["loss"], abs=1e-5), layout
            assert ours["rewards/margins"] == pytest.approx(expected["rewards/margins"], abs=1e-5), layout


# --------------------------------------------------------------------------- in one process
def tiny_config() -> GPTConfig:
    return GPTConfig.preset(
        "qwen2",
        vocab_size=64,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        tie_word_embeddings=False,
    )


def trainer(callbacks, steps: int, mbs: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=mbs),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        **kwargs,
    )


def rule_pairs(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompt: 6 random tokens. Chosen answer: 3 tokens from the lower half of the vocabulary;
    rejected: 3 from the upper half (the rule to learn)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        prompt = torch.randint(1, 64, (6,), generator=g)
        pair = {}
        for side, low in (("chosen", 1), ("rejected", 32)):
            answer = torch.randint(low, low + 31, (3,), generator=g)
            pair[f"{side}_input_ids"] = torch.cat([prompt, answer])
            pair[f"{side}_labels"] = torch.cat([torch.full((6,), -100), answer])
        rows.append(pair)
    return rows


class Metrics(L.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_frozen_copy_reference_and_learning_a_rule():
    """Without LoRA the reference is a frozen copy: at step 0 policy == reference, so the sigmoid
    loss is log 2 and every reward 0. Then the rule of the chosen answers is learned: the held-out
    reward accuracy ends far above chance."""
    module = GPTModule(tiny_config(), lr=3e-3, lr_decay="constant")
    metrics, dpo = Metrics(), DPO(beta=0.1)
    train = DataLoader(rule_pairs(1600, seed=1), batch_size=8, shuffle=True, drop_last=True)
    held_out = DataLoader(rule_pairs(64, seed=2), batch_size=8)
    fitted = trainer([dpo, metrics], steps=200, mbs=16, val_check_interval=200, limit_val_batches=8)
    fitted.fit(module, train, held_out)
    first = metrics.history[0]
    assert first["train/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert first["train/rewards/chosen"] == first["train/rewards/rejected"] == 0.0
    assert fitted.callback_metrics["val/rewards/accuracies"] > 0.9
    assert fitted.callback_metrics["val/rewards/margins"] > 1.0


def test_lora_reference_holds_no_second_copy():
    """Parameters held during training: with LoRA, the model's own (base + adapters) and nothing
    else; without, a frozen reference as large as the model besides it."""
    held = {}

    class Count(L.Callback):
        def __init__(self, dpo, name):
            self.dpo, self.name = dpo, name

        def on_train_start(self, trainer, module):
            reference = sum(p.numel() for c in self.dpo.reference or [] for p in c.parameters())
            held[self.name] = (sum(p.numel() for p in module.parameters()), reference)

    data = DataLoader(rule_pairs(4, 0), batch_size=4)
    with_lora, copy = DPO(), DPO()
    trainer([LoRA(r=2), with_lora, Count(with_lora, "lora")], steps=1).fit(GPTModule(tiny_config()), data)
    trainer([copy, Count(copy, "copy")], steps=1).fit(GPTModule(tiny_config()), data)
    model, _ = held["copy"]
    adapters = held["lora"][0] - model
    assert 0 < adapters < model / 10
    assert held["lora"][1] == 0 and held["copy"][1] == model


def test_bad_pairs_and_options_are_refused():
    pairs = {k: v.clone() for k, v in preference_pairs().items()}
    empty = dict(pairs, rejected_labels=torch.full_like(pairs["rejected_labels"], -100))
    with pytest.raises(ValueError, match="pair 0 of the batch has an empty rejected response"):
        pairs_to_rows(empty)
    other = dict(pairs, rejected_input_ids=pairs["rejected_input_ids"].clone())
    other["rejected_input_ids"][1, 0] += 1
    with pytest.raises(ValueError, match="pair 1 of the batch: chosen and rejected have different prompts"):
        pairs_to_rows(other)
    filler = dict(empty, chosen_labels=torch.full_like(pairs["chosen_labels"], -100))
    assert pairs_to_rows(filler)["input_ids"].shape[0] == 8  # no response on either side: a filler pair
    with pytest.raises(ValueError, match="loss_type='kto'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="micro_batch_size=1 must be even"):
        trainer([DPO()], steps=1, mbs=1).fit(GPTModule(tiny_config()), DataLoader(rule_pairs(2, 0), batch_size=2))


def test_reference_checkpoint_of_another_architecture_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_megatron import CheckpointError

    bigger = dataclasses.replace(tiny_config(), num_layers=3)
    saver = L.Trainer(
        strategy=MegatronStrategy(),
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)],
    )
    rows = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_input_ids"]} for r in rule_pairs(2, 0)]
    saver.fit(GPTModule(bigger), DataLoader(rows, batch_size=2))
    checkpoint = next(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="num_layers: 3 in the checkpoint, 2 here"):
        trainer([DPO(ref_load=checkpoint)], steps=1).fit(
            GPTModule(tiny_config()), DataLoader(rule_pairs(2, 0), batch_size=2)
        )


def test_lora_dpo_example_runs(tmp_path):
    from tests.conftest import ROOT

    out = tmp_path / "out"
    run_job([str(ROOT / "examples" / "lora_dpo.py"), "--tiny", "--max-steps", "4", "--out", str(out)], cwd=tmp_path)
    assert (out / "peft" / "adapter_config.json").exists()
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "tokenizer.json").exists()
