"""The MoE fast path (lightning_megatron.models.moe): stacked experts and the sorted dispatcher,
against Megatron's per-expert SequentialMLP and its own dispatchers (fused_kernels=False)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from lightning_megatron import CheckpointError, GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.models.layers import GatedSharedExperts
from lightning_megatron.models.moe import GroupedExperts, SortedTokenDispatcher, StackedExperts, _ExpandRows, _SumRows
from tests.test_training import CONFIG, Losses, loader, trainer

MOE = dict(num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_shared_expert_intermediate_size=64)


def moe_module(**kwargs):
    return GPTModule(GPTConfig.preset("qwen2_moe", **CONFIG, **MOE), lr=3e-3, lr_decay="constant", **kwargs)


def fit(fused: bool, steps: int, ckpt_path=None, save_to=None, optim_format="dp_reshardable"):
    from lightning_megatron import MegatronCheckpointIO

    losses = Losses()
    callbacks = [losses]
    if save_to is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_to, every_n_train_steps=2, save_top_k=-1))
    strategy = MegatronStrategy(
        micro_batch_size=2, fused_kernels=fused, checkpoint_io=MegatronCheckpointIO(optim_format=optim_format)
    )
    model = moe_module()
    trainer(strategy=strategy, max_steps=steps, callbacks=callbacks, enable_checkpointing=save_to is not None).fit(
        model, loader(), ckpt_path=ckpt_path
    )
    return losses.values, model


def gpt_of(model):
    """The Megatron GPTModel inside the module's (DDP- and Float16Module-wrapped) first chunk."""
    chunk = model.chunks[0]
    while not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def experts_of(model):
    return gpt_of(model).decoder.layers[0].mlp


def test_rows_expand_and_sum_are_each_others_adjoint():
    """_ExpandRows / _SumRows against plain indexing, in value and gradient."""
    torch.manual_seed(0)
    tokens, k, hidden = 7, 3, 5
    rows_token = torch.randperm(tokens * k) % tokens  # each token appears k times
    token_rows = torch.sort(rows_token, stable=True).indices
    x = torch.randn(tokens, hidden, requires_grad=True)
    expanded = _ExpandRows.apply(x, rows_token, token_rows, k)
    assert torch.equal(expanded, x[rows_token])
    y = torch.randn(tokens * k, hidden, requires_grad=True)
    summed = _SumRows.apply(y, rows_token, token_rows, k)
    reference = torch.zeros(tokens, hidden).index_add(0, rows_token, y)
    assert torch.allclose(summed, reference, atol=1e-6)
    g_rows, g_tokens = torch.randn(tokens * k, hidden), torch.randn(tokens, hidden)
    (expanded * g_rows).sum().backward()
    (summed * g_tokens).sum().backward()
    assert torch.allclose(x.grad, torch.zeros(tokens, hidden).index_add(0, rows_token, g_rows), atol=1e-6)
    assert torch.equal(y.grad, g_tokens[rows_token])


def test_fast_path_trains_like_megatron_per_expert_path():
    """Stacked experts + sorted dispatcher against SequentialMLP + Megatron's dispatcher: the same
    model (initialization does not depend on the expert layout) and the same fp32 losses."""
    fast, fast_model = fit(True, 4)
    slow, slow_model = fit(False, 4)
    assert isinstance(experts_of(fast_model).experts, StackedExperts)
    assert isinstance(experts_of(fast_model).token_dispatcher, SortedTokenDispatcher)
    assert type(experts_of(slow_model).experts) is GroupedExperts
    assert not isinstance(experts_of(slow_model).token_dispatcher, SortedTokenDispatcher)
    # The tensor-core router is installed on the fast path; on CPU it runs Megatron's fp32 GEMM.
    assert "gating" in vars(experts_of(fast_model).router) and "gating" not in vars(experts_of(slow_model).router)
    # So are the embedding's gradient rows straight into main_grad (the model's embeddings are untied).
    fast_embedding, slow_embedding = (gpt_of(m).embedding.word_embeddings for m in (fast_model, slow_model))
    assert "forward" in vars(fast_embedding) and "forward" not in vars(slow_embedding)
    # And the compiled shared-expert gate (its eager form on CPU).
    assert type(experts_of(fast_model).shared_experts) is GatedSharedExperts
    assert type(experts_of(slow_model).shared_experts) is SharedExpertMLP
    assert fast == pytest.approx(slow, abs=2e-5)


@pytest.mark.parametrize("saved_fused", [True, False], ids=["stacked-to-per-expert", "per-expert-to-stacked"])
def test_checkpoints_move_between_expert_layouts(tmp_path, saved_fused):
    """A torch_dist checkpoint of stacked experts is one of SequentialMLP experts and back:
    resuming in the other layout continues the same run (weights and, saved 'fully_reshardable',
    Adam states). A 'dp_reshardable' optimizer state follows the flat buffer order, which differs:
    that resume is refused, and loading the weights alone works."""
    uninterrupted, _ = fit(saved_fused, 4, optim_format="fully_reshardable")
    first, _ = fit(saved_fused, 2, save_to=tmp_path / "full", optim_format="fully_reshardable")
    resumed, _ = fit(not saved_fused, 4, ckpt_path=tmp_path / "full" / "epoch=0-step=2.ckpt")
    assert first == pytest.approx(uninterrupted[:2], abs=1e-6)
    assert resumed == pytest.approx(uninterrupted[2:], abs=2e-5)

    fit(saved_fused, 2, save_to=tmp_path / "dp")
    with pytest.raises(CheckpointError, match="experts"):
        fit(not saved_fused, 4, ckpt_path=tmp_path / "dp" / "epoch=0-step=2.ckpt")


def test_lora_unstacks_experts_and_trains_expert_adapters():
    """Expert adapters need one linear per expert: the LoRA callback unstacks the experts
    (same weights), and the expert adapters get gradients through the grouped path's fallback."""
    from lightning_megatron.callbacks import LoRA

    model = moe_module()
    trainer(max_steps=2, callbacks=[LoRA(r=4, target_modules=["linear_fc1", "linear_fc2"])]).fit(model, loader())
    experts = experts_of(model).experts
    assert type(experts) is GroupedExperts
    # B starts at zero (peft's init) and moves only if the adapter is in the forward pass.
    assert experts.local_experts[0].linear_fc1.lora_B.weight.abs().sum() > 0
