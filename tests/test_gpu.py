"""GPU checks (skipped without CUDA): bf16 training of a ~1B model, and NCCL layouts vs one GPU."""

from __future__ import annotations

import gc
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.callbacks import ThroughputMonitor, model_flops_per_token
from tests.conftest import train_layouts
from tests.test_training import Losses

pytestmark = pytest.mark.gpu

ONE_B = dict(
    vocab_size=32000,
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=5632,
    tie_word_embeddings=False,
)


def gpu_trainer(steps: int, callbacks: list, strategy: MegatronStrategy | None = None, **kwargs) -> L.Trainer:
    """One GPU, bf16-mixed, no logger or progress bar, checkpointing off unless asked for."""
    # Earlier fits' modules (CUDA-graph pools among them) sit in reference cycles: free them, and
    # hand their cached blocks back, before this fit's NCCL communicators allocate.
    gc.collect()
    torch.cuda.empty_cache()
    return L.Trainer(
        strategy=strategy or MegatronStrategy(micro_batch_size=2),
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        callbacks=callbacks,
        **kwargs,
    )


def test_bf16_one_billion_tp1_trains():
    seq, global_batch, steps = 2048, 8, 12
    torch.manual_seed(0)
    rows = torch.randint(0, 32000, (global_batch * steps, seq))
    data = [{"input_ids": r, "labels": r} for r in rows]
    monitor = ThroughputMonitor(window=4)
    record = Losses()

    config = GPTConfig.preset("llama", **ONE_B)
    model = GPTModule(config, lr=3e-4)
    trainer = gpu_trainer(steps, [monitor, record])
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=global_batch))
    losses = record.values
    params = sum(p.numel() for p in model.parameters())
    last = monitor.history[-1]
    print(
        f"\n1B bf16 TP1: params={params / 1e9:.2f}B losses={[round(x, 3) for x in losses]} "
        f"tokens/s={last['perf/tokens_per_sec']:.0f} TFLOP/s={last['perf/tflops_per_device']:.0f} "
        f"MFU={last.get('perf/mfu', float('nan')):.3f} peak={last['perf/peak_memory_gib']:.1f}GiB "
        f"wall={time.perf_counter() - start:.0f}s flops/token={model_flops_per_token(config, seq):.3g}"
    )
    assert 0.8e9 < params < 1.2e9
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_layouts_match_one_gpu(tmp_path):
    """tp2, pp2 and dp2 over NCCL against one GPU. dp2 trains with the layers' CUDA graphs (the
    default where tp = pp = 1), its gradients reduced by Megatron DDP after the step or, with
    'overlap', by its hooks while the backward runs."""
    one = train_layouts(tmp_path, 1, "dense", ["tp1_eager"], accelerator="gpu")
    two = train_layouts(tmp_path, 2, "dense", ["tp2", "pp2", "dp2", "dp2_overlap"], accelerator="gpu")
    for layout, run in two.items():
        print(f"\n{layout}: {run['loss']} vs {one['tp1_eager']['loss']}")
        assert run["loss"] == pytest.approx(one["tp1_eager"]["loss"], abs=1e-4)
    assert two["dp2"]["graphed_layers"] > 0 and two["dp2_overlap"]["graphed_layers"] > 0
    assert two["tp2"]["graphed_layers"] == 0 == one["tp1_eager"]["graphed_layers"]


def test_gpu_resume_matches_uninterrupted(tmp_path):
    """bf16 on CUDA: 2 steps, save, resume 2 more == 4 uninterrupted (cuBLAS is deterministic
    for the same shapes; the tolerance only covers atomics in attention backward), with the
    fused AdamW before and after the load."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_megatron.data.text import ByteTokenizer, TokenBlocks, bundled_corpus

    data = TokenBlocks.from_text(bundled_corpus()[:40000], ByteTokenizer(), 128)

    class FusedAdam(L.Callback):
        """The fast path's fused AdamW stays fused, with its step counters on the GPU, after a load."""

        def on_train_end(self, trainer, module):
            torch_optimizer = trainer.strategy.optimizers[0].megatron.optimizer
            assert all(group["fused"] and not group["foreach"] for group in torch_optimizer.param_groups)
            assert {state["step"].device.type for state in torch_optimizer.state.values()} == {"cuda"}

    def fit(steps, ckpt_path=None, callbacks=()):
        record = Losses()
        callbacks = [*callbacks, FusedAdam()]

        config = GPTConfig.preset(
            "qwen2",
            vocab_size=257,
            num_layers=2,
            hidden_size=256,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=512,
        )
        trainer = gpu_trainer(steps, [record, *callbacks], enable_checkpointing=len(callbacks) > 1)
        trainer.fit(
            GPTModule(config, lr=1e-3, lr_decay="constant"), DataLoader(data, batch_size=8), ckpt_path=ckpt_path
        )
        return record.values

    uninterrupted = fit(4)
    fit(2, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)])
    resumed = fit(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    print(f"\nGPU resume: {resumed} vs {uninterrupted[2:]}")
    assert resumed == pytest.approx(uninterrupted[2:], abs=1e-3)


def test_lora_and_dpo_bf16_on_gpu(tmp_path):
    """LoRA + DPO (reference: adapters off) in bf16 on CUDA: losses fall, margins grow, and
    merging the adapters into the bf16 weights keeps the logits (within bf16 rounding)."""
    from lightning_megatron.callbacks import DPO, LoRA
    from lightning_megatron.lora import merge_lora
    from tests.hf_models import make_hf_model
    from tests.scripts.dpo_layouts import loader as pairs_loader
    from tests.scripts.lora_layouts import loader as rows_loader

    hf = make_hf_model("qwen2", tmp_path / "qwen2")
    module = GPTModule.from_hf(hf, lr=1e-2, lr_decay="constant")

    record = Losses()
    gpu_trainer(6, [LoRA(r=4, alpha=8, init="random"), DPO(beta=0.1), record]).fit(module, pairs_loader())
    print(f"\nGPU LoRA+DPO losses: {record.values}")
    assert record.values[-1] < record.values[0]
    unmerged = gpu_trainer(0, [LoRA(r=4, alpha=8, init="random")]).predict(module, rows_loader())[0]
    assert merge_lora(module.chunks) == 16
    merged = gpu_trainer(0, []).predict(module, rows_loader())[0]
    assert (merged - unmerged).abs().max().item() < 0.1 * unmerged.abs().max().item()
    assert (merged.argmax(-1) == unmerged.argmax(-1)).float().mean() > 0.95


def test_moe_fast_path_bf16_matches_per_expert_path_without_host_syncs():
    """Stacked experts + sorted dispatcher + fused AdamW (the default) against Megatron's
    per-expert experts, dispatcher and foreach AdamW (fused_kernels=False) in bf16 on the GPU,
    and the MoE layer's forward and backward run without a single device-to-host sync."""
    from tests.test_moe import MOE, experts_of
    from tests.test_training import CONFIG, loader

    class NoHostSync(L.Callback):
        def on_train_end(self, trainer, module):
            mlp = experts_of(module)
            x = torch.randn(64, 2, CONFIG["hidden_size"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out, _ = mlp(x)
                out.float().square().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")

    runs = {}
    for fused in (True, False):
        losses = Losses()
        callbacks = [losses, *([NoHostSync()] if fused else [])]
        trainer = gpu_trainer(6, callbacks, MegatronStrategy(micro_batch_size=2, fused_kernels=fused))
        config = GPTConfig.preset("qwen2_moe", **CONFIG, **MOE)
        trainer.fit(GPTModule(config, lr=3e-3), loader())
        runs[fused] = losses.values
    print(f"\nstacked+sorted {runs[True]}\nper-expert     {runs[False]}")
    assert runs[True] == pytest.approx(runs[False], abs=3e-2)


def test_weight_gradient_accumulates_into_fp32_main_grad_in_the_gemm():
    """gradient_accumulation_fusion's GEMM: the bf16 weight gradient is summed in fp32 straight
    into main_grad, never rounded to bf16 (the unfused fallback's error is ~100x larger)."""
    from lightning_megatron.models.kernels import HAS_FP32_OUT_GEMM, wgrad_gemm_accum_fp32

    torch.manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda").bfloat16()
    g = torch.randn(4096, 512, device="cuda").bfloat16()
    main_grad = torch.randn(512, 1024, device="cuda")
    exact = main_grad.double() + g.double().t() @ x.double()
    wgrad_gemm_accum_fp32(x, g, main_grad)
    error = (main_grad.double() - exact).abs().max().item()
    rounding = ((g.t() @ x).double() - g.double().t() @ x.double()).abs().max().item()  # the fallback's
    assert HAS_FP32_OUT_GEMM and error < 1e-2 < rounding, (error, rounding)


def test_expert_weight_gradients_accumulate_into_fp32_main_grad_in_the_gemm():
    """The Triton grouped GEMM adds each expert's ``grad^T @ x`` into its fp32 main_grad tile by
    tile, to fp32 accuracy: uneven experts, an empty one, shapes that are no multiple of the tiles,
    and what was in main_grad before is kept."""
    from lightning_megatron.models.expert_kernels import grouped_wgrad_accumulate

    torch.manual_seed(0)
    counts = torch.tensor([300, 0, 1, 517, 64, 90], device="cuda")
    ends = counts.cumsum(0).to(torch.int32)
    rows, out, inp = int(counts.sum()), 200, 136
    grad = torch.randn(rows, out, device="cuda").bfloat16()
    x = torch.randn(rows, inp, device="cuda").bfloat16()
    main_grad = torch.randn(len(counts), out, inp, device="cuda")
    exact = main_grad.double().clone()
    for e, (start, stop) in enumerate(zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)):
        exact[e] += grad[start:stop].double().t() @ x[start:stop].double()
    grouped_wgrad_accumulate(grad, x, ends, main_grad)
    assert (main_grad.double() - exact).abs().max().item() < 1e-3


def test_stacked_experts_train_alike_with_and_without_the_fused_weight_gradient():
    """The MoE model with its expert weight gradients accumulated in the GEMM (the default) against
    the same model with torch's grouped GEMM gradient and a separate fp32 add: the same steps."""
    from tests.test_moe import MOE, experts_of
    from tests.test_training import CONFIG, loader

    class Switch(L.Callback):
        def __init__(self, fuse: bool) -> None:
            self.fuse = fuse

        def on_train_start(self, trainer, module):
            experts = experts_of(module).experts
            assert experts.fuse_wgrad and experts.weights_into_main_grad()  # on by default
            experts.fuse_wgrad = self.fuse

    runs = {}
    for fuse in (True, False):
        losses = Losses()
        trainer = gpu_trainer(6, [losses, Switch(fuse)], MegatronStrategy(micro_batch_size=2, cuda_graphs=False))
        trainer.fit(GPTModule(GPTConfig.preset("qwen2_moe", **CONFIG, **MOE), lr=3e-3), loader())
        runs[fuse] = losses.values
    assert runs[True] == pytest.approx(runs[False], abs=2e-3)


def test_shared_expert_gate_is_as_accurate_as_megatrons_in_bf16():
    """The compiled shared-expert gate and Megatron's GEMM + sigmoid + multiply, both in bf16,
    against the float64 result: output and gradients are each within twice Megatron's own error
    (they round at the same points; the sums run in another order)."""
    from lightning_megatron.models.layers import _SharedExpertGate

    torch.manual_seed(0)
    x = torch.randn(2, 4096, 1536, device="cuda").bfloat16()
    out = torch.randn(2, 4096, 1536, device="cuda").bfloat16()
    w = (torch.randn(1, 1536, device="cuda") * 0.02).bfloat16()
    grad = torch.randn(2, 4096, 1536, device="cuda").bfloat16()

    def megatron(x, o, w):
        return o * torch.sigmoid(torch.nn.functional.linear(x, w))

    results = []
    cases = ((megatron, torch.float64), (megatron, torch.bfloat16), (_SharedExpertGate.apply, torch.bfloat16))
    for gate, dtype in cases:
        xi, oi, wi = (t.to(dtype).requires_grad_() for t in (x, out, w))
        y = gate(xi, oi, wi)
        y.backward(grad.to(dtype))
        results.append((y, xi.grad, oi.grad, wi.grad))
    for name, exact, theirs, ours in zip(("output", "x grad", "out grad", "w grad"), *results, strict=True):
        assert ours.dtype == torch.bfloat16
        error, reference = ((t.double() - exact).abs().max().item() for t in (ours, theirs))
        assert error <= 2 * reference + 1e-6, (name, error, reference)


def test_compiled_qkv_split_and_rope_match_megatrons_steps():
    """The compiled bias + head split + RoPE of FusedQKVSelfAttention against Megatron's eager
    steps on the GPU, in fp32 (the same arithmetic, fused) and in value and gradient."""
    from lightning_megatron.models.layers import _qkv_rope
    from tests.test_kernels import qkv_rope_reference

    torch.manual_seed(0)
    groups, q_per_group, head_dim = 2, 6, 128
    mixed = torch.randn(512, 2, groups * (q_per_group + 2) * head_dim, device="cuda")
    bias = torch.randn(mixed.shape[-1], device="cuda")
    freqs = torch.randn(512, 1, 1, head_dim, device="cuda")
    results = []
    for fn in (qkv_rope_reference, _qkv_rope):
        m, b = mixed.clone().requires_grad_(), bias.clone().requires_grad_()
        outs = fn(m, b, freqs, groups, q_per_group, head_dim)
        torch.autograd.backward(outs, [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)])
        results.append((*outs, m.grad, b.grad))
    for ours, megatron in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, megatron, rtol=1e-4, atol=1e-3)


def test_weighted_swiglu_backward_kernel_matches_torch():
    """The one-pass Triton backward of the experts' weighted SwiGLU against its torch form (the
    CPU path, checked against Megatron's in test_kernels), in bf16 on the benchmark's shapes."""
    from lightning_megatron.models.expert_kernels import _WeightedSwiGLU

    torch.manual_seed(0)
    x = torch.randn(32768, 1024, device="cuda").bfloat16()
    probs, grad = torch.rand(32768, 1, device="cuda"), torch.randn(32768, 512, device="cuda").bfloat16()
    results = []
    for device in ("cuda", "cpu"):
        xi, pi = (t.detach().to(device).requires_grad_() for t in (x, probs))
        _WeightedSwiGLU.apply(xi, pi).backward(grad.to(device))
        results.append((xi.grad.cpu().float(), pi.grad.cpu()))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-2, atol=1e-2)


def test_tensor_core_router_matches_megatrons_fp32_gemm():
    """The fp32 router logits from bf16 tensor-core GEMMs (the fast path) against Megatron's fp32
    GEMM on fp32 copies: the same products, summed in another order; the gradients, rounded
    once to bf16 by both, agree to that rounding."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    from lightning_megatron.models.moe import _Fp32Logits

    torch.manual_seed(0)
    x = torch.randn(2, 4096, 1536, device="cuda").bfloat16()
    w = (torch.randn(32, 1536, device="cuda") * 0.02).bfloat16()
    grad = torch.randn(2, 4096, 32, device="cuda")
    results = []
    for logits in (lambda x, w: router_gating_linear(x, w, None, torch.float32), _Fp32Logits.apply):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = logits(xi, wi)
        y.backward(grad)
        results.append((y, xi.grad, wi.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results[1], results[0]
    assert y.dtype == torch.float32 and gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(gw.float(), gw_ref.float(), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("family, overlap", [("qwen2", False), ("qwen2_moe", False), ("qwen2_moe", True)])
def test_cuda_graphs_train_like_eager(family, overlap):
    """Transformer layers replayed as CUDA graphs (the default on one GPU) against the same model
    run eagerly: the same kernels, so the same losses, with Megatron's fused weight-gradient
    accumulation, the MoE fast path and its auxiliary loss inside the graphs; evaluation and
    other shapes run eagerly. The gradients go into main_grad inside the graphs, or, with
    overlapped gradient reduction, through Megatron DDP's hooks; a second fit captures again."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from tests.test_moe import MOE
    from tests.test_training import CONFIG, loader

    moe = MOE | {"moe_aux_loss_coeff": 0.01}
    config = GPTConfig.preset(family, **CONFIG, **(moe if family == "qwen2_moe" else {}))

    def graph_keys(module):
        layers = [m for m in module.modules() if isinstance(m, TransformerLayer)]
        return [getattr(getattr(layer, "cuda_graphs", None), "key", None) for layer in layers]

    class Captured(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            self.keys = graph_keys(module)

    runs, captured = {}, {}
    for graphs in (True, False):
        losses, first, second = Losses(), Captured(), Captured()
        strategy = MegatronStrategy(micro_batch_size=2, cuda_graphs=graphs, overlap_grad_reduce=overlap)
        trainer = gpu_trainer(6, [losses, first], strategy, val_check_interval=3, limit_val_batches=2)
        module = GPTModule(config, lr=3e-3)
        trainer.fit(module, loader(), loader())
        # A second fit of the same module: a new DDP wrapper with new gradient buffers, which the
        # graphs must notice (and be captured again for) instead of adding into the old ones.
        strategy = MegatronStrategy(micro_batch_size=2, cuda_graphs=graphs, overlap_grad_reduce=overlap)
        gpu_trainer(3, [losses, second], strategy).fit(module, loader())
        captured[graphs] = first.keys + second.keys
        runs[graphs] = losses.values
        assert not any(graph_keys(module))  # the end of a fit frees its graphs
    print(f"\n{family} graphs {runs[True]}\n{family} eager  {runs[False]}")
    assert all(captured[True]) and not any(captured[False])
    assert runs[True] == pytest.approx(runs[False], abs=2e-3)


def test_cross_entropy_row_stats_kernel_matches_torch():
    """The single-pass Triton (max, sum of exponentials) per row behind the cross entropy on CUDA,
    against torch's logsumexp in fp32 (a vocabulary that is no multiple of the block, a row with
    -inf logits, an empty batch), and the loss and its gradient against F.cross_entropy."""
    import torch.nn.functional as F

    from lightning_megatron.models import kernels

    torch.manual_seed(0)
    logits = (torch.randn(64, 151936, device="cuda") * 4).to(torch.bfloat16)
    logits[3, :100_000] = float("-inf")
    row_max, sum_exp = kernels._row_max_sum_exp_triton(logits)
    expected_max, expected_sum = kernels._row_max_sum_exp_torch(logits)
    assert torch.equal(row_max, expected_max)
    torch.testing.assert_close(sum_exp, expected_sum, rtol=2e-5, atol=0)
    torch.testing.assert_close(row_max + sum_exp.log(), torch.logsumexp(logits.float(), -1), rtol=1e-6, atol=1e-5)
    assert [t.shape for t in kernels._row_max_sum_exp_triton(logits[:0])] == [(0,), (0,)]

    logits = (torch.randn(64, 50_000, device="cuda") * 4).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 50_000, (64,), device="cuda")
    loss = kernels.vocab_parallel_cross_entropy(logits, target)
    reference_logits = logits.detach().float().requires_grad_(True)
    reference = F.cross_entropy(reference_logits, target, reduction="none")
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    grad = torch.rand(64, device="cuda")
    loss.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=1e-6)
