"""The fast path's kernels (lightning_megatron.models.kernels) against plain torch
and against Megatron-Core's own eager path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.models.kernels import (
    multi_tensor_l2norm,
    rotary,
    row_max_sum_exp,
    vocab_parallel_cross_entropy,
    wgrad_gemm_accum_fp32,
)
from tests.test_training import CONFIG, Losses, loader, trainer


def test_cross_entropy_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (3 * torch.randn(6, 2, 50)).requires_grad_()
    target = torch.randint(0, 50, (6, 2))
    upstream = torch.rand(6, 2)
    loss = vocab_parallel_cross_entropy(logits, target)
    (loss * upstream).sum().backward()
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.view(-1, 50), target.view(-1), reduction="none").view(6, 2)
    (reference * upstream).sum().backward()
    # fp32 throughout: only rounding separates the two.
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-6)


def test_cross_entropy_keeps_bf16_logits_and_matches_fp32_math():
    torch.manual_seed(1)
    logits = (3 * torch.randn(8, 1, 300)).bfloat16().requires_grad_()
    target = torch.randint(0, 300, (8, 1))
    loss = vocab_parallel_cross_entropy(logits, target)
    loss.sum().backward()
    reference = F.cross_entropy(logits.detach().float().view(-1, 300), target.view(-1), reduction="none")
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    # The loss is computed in fp32 from the same bf16 values; the gradient is rounded to bf16 once.
    assert torch.allclose(loss.view(-1), reference, atol=1e-5)
    softmax = torch.softmax(logits.detach().float().view(-1, 300), -1) - F.one_hot(target.view(-1), 300)
    assert torch.allclose(logits.grad.float().view(-1, 300), softmax, atol=4e-3)


def test_row_statistics_combine_across_vocabulary_shards_like_logsumexp():
    """The (max, sum of exponentials) pairs of vocabulary slices, rescaled to the global max and
    added, as vocab-parallel ranks combine them, give the whole row's logsumexp; a slice of -inf
    only (no finite logit) contributes 0, not NaN."""
    torch.manual_seed(2)
    logits = 5 * torch.randn(7, 96)
    logits[2, :32] = float("-inf")
    pairs = [row_max_sum_exp(piece) for piece in logits.split(32, dim=-1)]
    global_max = torch.stack([m for m, _ in pairs]).amax(0)
    total = sum(s * torch.exp(m - global_max) for m, s in pairs)
    torch.testing.assert_close(global_max + total.log(), torch.logsumexp(logits, -1))
    row_max, sum_exp = row_max_sum_exp(logits[2:3, :32])
    assert row_max.item() == float("-inf") and sum_exp.item() == 0.0


def test_rotary_matches_megatron_unfused():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(2)
    t = torch.randn(16, 2, 4, 32)
    freqs = torch.randn(16, 1, 1, 32)
    assert torch.equal(rotary(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))


def test_wgrad_accumulates_into_main_grad():
    torch.manual_seed(3)
    x, g = torch.randn(10, 6), torch.randn(10, 4)
    main_grad = torch.randn(4, 6)
    expected = main_grad + g.t() @ x
    wgrad_gemm_accum_fp32(x, g, main_grad)
    assert torch.allclose(main_grad, expected, atol=1e-6)


def test_grad_norm_fills_megatron_slot_and_matches_its_fallback():
    """Megatron's grad norm (used every step) runs our one-kernel L2 norm, which agrees with the
    fallback it replaces (that one reads each tensor's norm to the host)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    import lightning_megatron  # noqa: F401  (installs the slots)

    assert clip_grads.l2_norm_impl is multi_tensor_l2norm
    tensors = [torch.randn(10), torch.randn(3, 4), torch.randn(7, dtype=torch.float64)]
    total, per_tensor = multi_tensor_l2norm(2048, None, [tensors], True)
    expected = torch.cat([t.flatten().float() for t in tensors]).norm()
    assert total.shape == (1,) and total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert per_tensor.tolist() == pytest.approx([t.norm().item() for t in tensors], rel=1e-6)
    if torch.cuda.is_available():  # the fallback hard-codes CUDA
        cuda = [t.cuda() for t in tensors]
        reference, _ = local_multi_tensor_l2_norm(2048, None, [cuda], False)
        assert multi_tensor_l2norm(2048, None, [cuda], False)[0].item() == pytest.approx(reference.item(), rel=1e-6)


def test_fused_path_trains_like_megatron_eager_path():
    """Our cross entropy (the CPU part of the dense fast path) against Megatron's own: same
    losses over a few fp32 steps. The MoE part: tests/test_moe.py."""
    config = GPTConfig.preset("qwen2", **CONFIG)
    runs = {}
    for fused in (True, False):
        losses = Losses()
        strategy = MegatronStrategy(micro_batch_size=2, fused_kernels=fused)
        trainer(strategy=strategy, max_steps=4, callbacks=[losses]).fit(GPTModule(config, lr=3e-3), loader())
        runs[fused] = losses.values
    assert runs[True] == pytest.approx(runs[False], abs=2e-5)


def test_cuda_graphs_asked_for_where_they_cannot_apply_is_refused():
    """cuda_graphs=True off CUDA names the requirement; the default (None) just runs eagerly."""
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=1e-3)
    with pytest.raises(ValueError, match=r"cuda_graphs=True\) needs a CUDA device"):
        trainer(strategy=MegatronStrategy(micro_batch_size=2, cuda_graphs=True), max_steps=1).fit(model, loader())
    losses = Losses()
    model = GPTModule(GPTConfig.preset("qwen2", **CONFIG), lr=1e-3)
    trainer(max_steps=1, callbacks=[losses]).fit(model, loader())
    assert len(losses.values) == 1


def test_embedding_gradient_rows_go_into_main_grad():
    """The word embedding's backward adds its rows into main_grad (repeated ids summed), marks the
    weight for DDP's hook, and hands autograd a placeholder; without Megatron DDP it returns the
    ordinary dense gradient."""
    from lightning_megatron.models.kernels import _EmbeddingIntoMainGrad

    torch.manual_seed(0)
    ids = torch.tensor([[3, 1, 3], [0, 3, 5]])
    grad = torch.randn(2, 3, 4)
    reference = torch.zeros(7, 4).index_add_(0, ids.reshape(-1), grad.reshape(-1, 4))

    plain = torch.nn.Parameter(torch.randn(7, 4))
    out = _EmbeddingIntoMainGrad.apply(ids, plain)
    assert torch.equal(out, plain[ids])
    out.backward(grad)
    assert torch.allclose(plain.grad, reference)

    wrapped = torch.nn.Parameter(torch.randn(7, 4).bfloat16())
    wrapped.main_grad, wrapped.grad_added_to_main_grad = torch.ones(7, 4), False
    _EmbeddingIntoMainGrad.apply(ids, wrapped).backward(grad.bfloat16())
    assert torch.allclose(wrapped.main_grad, 1 + reference, atol=1e-2) and wrapped.grad_added_to_main_grad
    assert wrapped.grad.shape == wrapped.shape  # the placeholder DDP's hook discards


def test_shared_expert_gate_matches_megatrons_formula():
    """The shared experts' gate as one function (compiled on CUDA, this eager form elsewhere)
    against Megatron's ``out * sigmoid(linear(x, w))``, in value and all three gradients."""
    from lightning_megatron.models.layers import _SharedExpertGate

    torch.manual_seed(4)
    x, out, w = torch.randn(5, 3, 16), torch.randn(5, 3, 16), torch.randn(1, 16)
    grad = torch.randn(5, 3, 16)
    results = []
    for gate in (lambda x, o, w: o * torch.sigmoid(F.linear(x, w)), _SharedExpertGate.apply):
        xi, oi, wi = (t.clone().requires_grad_() for t in (x, out, w))
        y = gate(xi, oi, wi)
        y.backward(grad)
        results.append((y, xi.grad, oi.grad, wi.grad))
    for ours, megatron in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, megatron, rtol=1e-5, atol=1e-6)


def test_local_spec_norm_is_torch_rms_norm():
    """The compiled RMSNorm of the fast path is torch's RMSNorm (its compiled form runs on CUDA)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lightning_megatron.models.layers import CompiledRMSNorm, Norm

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, normalization="RMSNorm")
    norm, reference = Norm(config, 16, eps=1e-6, compiled=True), Norm(config, 16, eps=1e-6)
    assert isinstance(norm, CompiledRMSNorm) and type(reference) is torch.nn.RMSNorm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16))
        reference.weight.copy_(norm.weight)
    x = torch.randn(4, 16)
    assert torch.equal(norm(x), reference(x))


def qkv_rope_reference(mixed, bias, freqs, groups, q_per_group, head_dim):
    """Megatron's path: the linear's bias add, its split of each KV group's heads, then RoPE."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    seq, batch = mixed.shape[:2]
    heads = (mixed + bias).view(seq, batch, groups, (q_per_group + 2) * head_dim)
    query, key, value = torch.split(heads, [q_per_group * head_dim, head_dim, head_dim], dim=3)
    query = query.reshape(seq, batch, -1, head_dim)
    return _apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs), value


def test_fused_qkv_split_and_rope_match_megatron():
    """FusedQKVSelfAttention's one function (bias, head split, RoPE; compiled on CUDA) against
    Megatron's separate steps, in value and gradient (fp32: equal up to rounding)."""
    from lightning_megatron.models.layers import _qkv_rope

    torch.manual_seed(5)
    groups, q_per_group, head_dim = 2, 3, 8
    mixed = torch.randn(6, 2, groups * (q_per_group + 2) * head_dim)
    bias = torch.randn(mixed.shape[-1])
    freqs = torch.randn(6, 1, 1, head_dim)
    grads = [torch.randn(6, 2, groups * q_per_group, head_dim), torch.randn(6, 2, groups, head_dim)]
    grads.append(torch.randn(6, 2, groups, head_dim))
    results = []
    for fn in (qkv_rope_reference, _qkv_rope):
        m, b = mixed.clone().requires_grad_(), bias.clone().requires_grad_()
        outs = fn(m, b, freqs, groups, q_per_group, head_dim)
        torch.autograd.backward(outs, grads)
        results.append((*outs, m.grad, b.grad))
    for ours, megatron in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, megatron, rtol=1e-5, atol=1e-5)


def test_weighted_swiglu_matches_megatron():
    """The experts' probability-weighted SwiGLU (one-pass backward: Triton on CUDA, this torch form
    elsewhere) against Megatron's fused one, in value and in both gradients (fp32)."""
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    from lightning_megatron.models.expert_kernels import weighted_swiglu

    torch.manual_seed(6)
    x, probs, grad = torch.randn(37, 2 * 24), torch.rand(37, 1), torch.randn(37, 24)
    results = []
    for fn in (lambda x, p: weighted_bias_swiglu_impl(x, None, p), weighted_swiglu):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        y = fn(xi, pi)
        y.backward(grad)
        results.append((y, xi.grad, pi.grad))
    for ours, megatron in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, megatron, rtol=1e-5, atol=1e-5)
