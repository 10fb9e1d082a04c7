"""LoRA against peft + transformers as the reference, under TP1, TP2 with sequence parallelism,
PP2 and (for MoE experts) EP2.

The job script (tests/scripts/lora_layouts.py) trains adapters with random A and B; this file
exports them with ``export_peft`` and checks that peft, on the same base model, gives the same
logits, loss and adapter gradients. Megatron fuses q/k/v and gate/up, so its A is shared by the
parts: peft's A-gradients of the parts sum to ours.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.callbacks import LoRA
from lightning_megatron.hf import export_peft, merge_lora_to_hf
from lightning_megatron.lora import LoRAConfig, lora_layers
from tests.conftest import SCRIPTS, run_job
from tests.hf_models import make_hf_model
from tests.scripts.lora_layouts import BATCH

pytestmark = pytest.mark.multiprocess
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_hf_model("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")


def run_lora(hf: Path, out: Path, devices: int, layout: str, *extra: str) -> dict:
    run_job(
        [str(SCRIPTS / "lora_layouts.py"), "--hf", str(hf), "--devices", str(devices), "--layout", layout]
        + ["--out", str(out), *extra],
        cwd=out.parent,
    )
    return torch.load(out / "result.pt")


def step_checkpoint(out: Path, step: int) -> Path:
    return next(p for p in (out / "steps").iterdir() if f"step={step}" in p.name)


def peft_model(hf: Path, adapters: Path, trainable: bool = False):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapters, is_trainable=trainable)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    diff = (a[..., :250] - b[..., :250]).abs().max().item()
    assert diff < tol, f"{what}: max difference {diff}"


def assert_same_adapter_grads(exported_grads: Path, model) -> None:
    """Our adapter gradients (a checkpoint of them, exported to PEFT form) vs the peft model's."""
    ours = load_file(exported_grads / "adapter_model.safetensors")
    theirs = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(ours) == sorted(theirs)
    summed_a: dict[str, torch.Tensor] = collections.defaultdict(lambda: 0)
    for name, grad in theirs.items():
        if ".lora_B." in name:
            torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # the parts of a fused linear share one A: their gradients add up
            module = name.split(".")[-3]
            summed_a[name.replace(module, FUSED.get(module, module))] += grad
    for name, grad in summed_a.items():
        part = next(
            m for m, fused in [*FUSED.items(), ("o_proj", "o_proj"), ("down_proj", "down_proj")] if fused in name
        )
        torch.testing.assert_close(ours[name.replace(FUSED.get(part, part), part)], grad, rtol=1e-4, atol=1e-6)


def check_against_peft(hf: Path, out: Path, result: dict) -> None:
    export_peft(out / "init", out / "peft_init", progress=False)
    export_peft(out / "grads", out / "peft_grads", progress=False)
    model = peft_model(hf, out / "peft_init", trainable=True)
    reference = model(BATCH, labels=BATCH)
    assert_close(reference.logits.detach(), result["init_logits"], "initial logits vs peft")
    assert reference.loss.item() == pytest.approx(result["losses"][0], abs=1e-5)
    reference.loss.backward()
    assert_same_adapter_grads(out / "peft_grads", model)

    # Trained adapters: the PEFT export and the merged HF export reproduce Megatron's logits.
    trained = step_checkpoint(out, 4)
    export_peft(trained, out / "peft_trained", progress=False)
    assert_close(peft_model(hf, out / "peft_trained")(BATCH).logits.detach(), result["trained_logits"], "peft")
    import transformers

    merge_lora_to_hf(trained, out / "merged", progress=False)  # base: the HF source it recorded
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert_close(merged(BATCH).logits.detach(), result["trained_logits"], "merged HF export")


@pytest.fixture(scope="module")
def tp1(qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1") / "out"
    return out, run_lora(qwen2, out, 1, "tp1")


def test_tp1_matches_peft_and_merges(qwen2, tp1):
    out, result = tp1
    check_against_peft(qwen2, out, result)
    assert result["merged_count"] == 16  # 4 layers x qkv, proj, fc1, fc2
    assert_close(result["merged_logits"], result["trained_logits"], "merged vs unmerged", tol=1e-5)
    assert result["losses"][-1] < result["losses"][0] - 0.3


def test_tp2_sequence_parallel_matches_peft_and_resumes(qwen2, tp1, tmp_path):
    out = tmp_path / "out"
    result = run_lora(qwen2, out, 2, "tp2_sp", "--resume")
    check_against_peft(qwen2, out, result)
    assert result["losses"] == pytest.approx(tp1[1]["losses"], abs=1e-5)
    assert_close(result["merged_logits"], result["trained_logits"], "merged vs unmerged under TP2", tol=1e-5)
    # Resumed from the step-2 adapter checkpoint: the same steps 3 and 4.
    assert result["resumed_losses"] == pytest.approx(result["losses"][2:], abs=1e-6)


def test_pp2_and_moe_experts_under_ep2(qwen2, tp1, tmp_path):
    result = run_lora(qwen2, tmp_path / "pp2", 2, "pp2")
    assert result["losses"] == pytest.approx(tp1[1]["losses"], abs=1e-5)
    assert_close(result["merged_logits"], tp1[1]["merged_logits"], "merged under PP2", tol=1e-4)

    moe = make_hf_model("qwen2_moe", tmp_path / "qwen2_moe")
    single = run_lora(moe, tmp_path / "moe1", 1, "tp1")
    experts = run_lora(moe, tmp_path / "moe_ep2", 2, "ep2")
    # 4 layers x (qkv, proj, shared fc1/fc2, 4 experts x fc1/fc2); rank 0 of EP2 holds 2 experts.
    assert (single["merged_count"], experts["merged_count"]) == (48, 32)
    assert experts["losses"] == pytest.approx(single["losses"], abs=1e-4)
    assert_close(experts["merged_logits"], experts["trained_logits"], "experts merged under EP2", tol=1e-5)
    with pytest.raises(ValueError, match="MoE expert"):
        export_peft(step_checkpoint(tmp_path / "moe1", 4), tmp_path / "peft_moe", progress=False)
    # The merged HF export works for experts: compare with the trained Megatron logits.
    import transformers

    merge_lora_to_hf(step_checkpoint(tmp_path / "moe1", 4), tmp_path / "moe_merged", progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe_merged", dtype=torch.float32)
    assert_close(merged(BATCH).logits.detach(), single["trained_logits"], "MoE merged HF export")


# --------------------------------------------------------------------------- in one process
def tiny() -> GPTModule:
    config = GPTConfig.preset(
        "qwen2",
        vocab_size=250,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        tie_word_embeddings=False,
    )
    return GPTModule(config, lr=1e-2)


def trainer(callbacks: list, steps: int = 2) -> L.Trainer:
    return L.Trainer(
        strategy=MegatronStrategy(),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
    )


def batches() -> DataLoader:
    return DataLoader([{"input_ids": r, "labels": r} for r in BATCH], batch_size=4)


def fit(module: GPTModule, callbacks: list, steps: int = 2) -> L.Trainer:
    fitted = trainer(callbacks, steps)
    fitted.fit(module, batches())
    return fitted


def test_only_adapters_train_and_hold_optimizer_state():
    seen = {}

    class Inspect(L.Callback):
        def on_train_end(self, trainer, module):
            optimizer = trainer.strategy.optimizers[0].megatron
            seen["optimized"] = {id(p) for group in optimizer.param_groups for p in group["params"]}
            seen["trainable"] = {id(p) for p in module.chunks.parameters() if p.requires_grad}
            seen["grad_buffers"] = sum(b.numel_unpadded for c in module.chunks for b in c.buffers)

    module = tiny()
    fit(module, [LoRA(r=2, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"]), Inspect()])
    layers = lora_layers(module.chunks)
    assert sorted({type(layer).__name__ for layer in layers}) == ["LoRAColumnParallelLinear", "LoRARowParallelLinear"]
    names = {n for n, p in module.chunks.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("0.output_layer") for n in names), names
    assert len(seen["optimized"]) == len(seen["trainable"]) == len(names)
    # Gradient buffers hold the adapters and the output layer only.
    expected = sum(p.numel() for p in module.chunks.parameters() if p.requires_grad)
    assert seen["grad_buffers"] == expected


def test_training_changes_only_adapters():
    module = tiny()
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = [(n, p, p.detach().clone()) for n, p in pl_module.chunks.named_parameters()]

    fit(module, [LoRA(r=2, init="random"), Snapshot()], steps=3)
    changed = {n for n, param, old in before if not torch.equal(param.detach(), old)}
    assert changed and all(".lora_" in n for n in changed), changed


def test_bad_targets_name_what_exists():
    with pytest.raises(ValueError, match="Hugging Face names"):
        LoRA(target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match=r"matched no linear.*linear_fc1"):
        fit(tiny(), [LoRA(target_regex=r"no\.such\.layer")])
    with pytest.raises(ValueError, match="modules_to_save"):
        fit(tiny(), [LoRA(modules_to_save=["classifier"])])
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig(r=0)


def test_adapter_load_and_adapter_checkpoint_errors(qwen2, tp1):
    from lightning_megatron import CheckpointError

    out, result = tp1
    trained = step_checkpoint(out, 4)
    logits = trainer([LoRA(r=4, alpha=8, adapter_load=trained)]).predict(GPTModule.from_hf(qwen2), batches())[0]
    assert_close(logits, result["trained_logits"], "adapter_load")
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        trainer([]).predict(GPTModule.from_hf(qwen2), batches(), ckpt_path=trained)
    with pytest.raises(CheckpointError, match="another shape.*r=4 saved, 8 here"):
        trainer([LoRA(r=8, alpha=8)]).predict(GPTModule.from_hf(qwen2), batches(), ckpt_path=trained)


def test_cli_exports_peft_and_merged(qwen2, tp1, tmp_path):
    import transformers

    from lightning_megatron.cli import main

    out, result = tp1
    trained = str(step_checkpoint(out, 4))
    assert main(["export", "--to-hf", "--adapters", trained, "--output", str(tmp_path / "peft")]) == 0
    assert_close(peft_model(qwen2, tmp_path / "peft")(BATCH).logits.detach(), result["trained_logits"], "CLI PEFT")
    merged = tmp_path / "merged"
    assert main(["export", "--to-hf", "--adapters", trained, "--merge-lora", "--output", str(merged)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert_close(model(BATCH).logits.detach(), result["trained_logits"], "CLI merged")


def test_base_load_from_a_full_checkpoint(tmp_path):
    full = tiny()
    fit(full, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    base = next(tmp_path.iterdir())
    expected = trainer([]).predict(full, batches())[0]
    other = GPTModule(full.config, seed=99)  # different initial weights, replaced by base_load
    logits = trainer([LoRA(r=2, base_load=base)]).predict(other, batches())[0]  # B = 0: the base model
    torch.testing.assert_close(logits, expected)
    with pytest.raises(Exception, match="adapter_load=.*holds no LoRA adapters"):
        trainer([LoRA(r=2, adapter_load=base)]).predict(GPTModule(full.config), batches())

    # Train adapters on that base, then merge them into it from the two torch_dist checkpoints
    # (the adapters record base_load): transformers on the merged export gives the LoRA model's logits.
    import transformers

    lora = dict(r=2, init="random", base_load=base)
    fit(other, [LoRA(**lora), ModelCheckpoint(dirpath=tmp_path / "adapters", every_n_train_steps=2)])
    trained = trainer([LoRA(**lora)]).predict(other, batches())[0]
    merged = merge_lora_to_hf(next((tmp_path / "adapters").iterdir()), tmp_path / "merged", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert_close(model(BATCH).logits.detach(), trained, "merged into a torch_dist base")


def test_modules_to_save_and_rslora_reach_peft(tmp_path):
    llama = make_hf_model("llama", tmp_path / "llama")  # untied: lm_head is its own module
    module = GPTModule.from_hf(llama, lr=1e-2, lr_decay="constant")
    lora = dict(r=4, alpha=8, init="random", use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"])
    fit(module, [LoRA(**lora, modules_to_save=["lm_head"]), ModelCheckpoint(dirpath=tmp_path / "ckpt")], steps=2)
    logits = trainer([LoRA(**lora, modules_to_save=["lm_head"])]).predict(module, batches())[0]
    export_peft(next((tmp_path / "ckpt").iterdir()), tmp_path / "peft", progress=False)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["use_rslora"] is True
    assert config["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]  # qkv is fused
    assert_close(peft_model(llama, tmp_path / "peft")(BATCH).logits.detach(), logits, "modules_to_save + rsLoRA")
