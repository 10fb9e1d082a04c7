"""GPTModule: a LightningModule around Megatron-Core's ``GPTModel`` (dense and MoE)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from lightning_megatron.models.config import GPTConfig
from lightning_megatron.models.graphs import use_layer_graphs
from lightning_megatron.models.init import init_weights
from lightning_megatron.models.kernels import use_embedding_grads_into_main_grad, vocab_parallel_cross_entropy
from lightning_megatron.models.moe import use_sorted_dispatch, use_tensor_core_router
from lightning_megatron.models.specs import block_spec
from lightning_megatron.optim import warmup_decay_lr


class GPTModule(L.LightningModule):
    """Train a Megatron-Core GPT model with any Lightning Trainer using ``MegatronStrategy``.

    Batches follow the transformers convention: ``input_ids`` ``[b, s]``, ``labels`` of the same
    shape (the module shifts them; ``-100`` is ignored), optional ``position_ids``,
    ``attention_mask`` (1 = real token) and ``loss_mask``.

    Args:
        config: the model's shape and architecture.
        lr, weight_decay, betas, eps: AdamW hyperparameters (Megatron's decoupled Adam).
        warmup_steps, lr_decay, min_lr_ratio: the LR schedule (see :func:`warmup_decay_lr`);
            decay runs to ``trainer.max_steps``.
        seed: weight-initialization seed; the same seed gives the same weights under any layout.
        packed_format: how packed rows (batches with ``segment_ids``) keep samples apart:
            ``"thd"`` lays the microbatch's samples end to end as Megatron's THD format
            (``PackedSeqParams`` with ``cu_seqlens``; Transformer Engine's fused kernels, or one
            causal SDPA per sample in the local spec), ``"mask"`` builds a block-diagonal mask for
            the local attention; ``"auto"``: THD with Transformer Engine, else the mask.
        hf_source: a Hugging Face model directory whose weights replace the initial ones (use
            :meth:`from_hf`, which also reads the config from it).

    Example::

        model = GPTModule(GPTConfig.preset("qwen2", num_layers=4, hidden_size=256), lr=3e-4)
        L.Trainer(strategy=MegatronStrategy(tp=2), devices=2, max_steps=20).fit(model, loader)
    """

    def __init__(
        self,
        config: GPTConfig,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        seed: int = 1234,
        hf_source: str | None = None,
        packed_format: str = "auto",
    ) -> None:
        super().__init__()
        if packed_format not in ("auto", "thd", "mask"):
            raise ValueError(f"packed_format={packed_format!r}; choose 'auto', 'thd' or 'mask'")
        self.save_hyperparameters()
        self.config = config
        self.chunks: torch.nn.ModuleList | None = None
        self._built_for: tuple | None = None
        # (microbatch, prepared inputs) -> Megatron loss function; None: the token-mean LM loss.
        # Callbacks that change the training objective (DPO) set it.
        self.objective: Callable[[dict[str, Tensor], dict[str, Any]], Callable] | None = None

    # ----------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build this rank's model chunks (one per virtual pipeline stage) for the strategy's layout."""
        strategy = self.trainer.strategy
        if not hasattr(strategy, "transformer_config_kwargs"):
            raise TypeError(
                f"GPTModule runs under MegatronStrategy, not {type(strategy).__name__}; "
                "pass strategy=MegatronStrategy(...) to the Trainer"
            )
        layout = strategy.layout_key()
        if self.chunks is not None:
            if self._built_for != layout:
                raise ValueError(
                    f"this GPTModule was built for layout {self._built_for} and cannot be reused "
                    f"under {layout}; create a new GPTModule (or load a checkpoint into one)"
                )
            return
        strategy.parallel.validate_model(self.config)
        if self.config.is_moe and strategy.parallel.expert_tp > 1 and strategy.root_device.type == "cpu":
            raise ValueError(
                f"etp={strategy.parallel.expert_tp}: expert tensor parallelism all-gathers uneven "
                "token counts, which gloo cannot do; on CPU set etp=1 (e.g. tp=2, ep=2, etp=1)"
            )
        self.chunks = torch.nn.ModuleList(self.build_chunks(strategy))
        self._built_for = layout

    def build_chunks(self, strategy: Any, initialize: bool = True) -> list[torch.nn.Module]:
        """New model chunks for the strategy's layout: initialized from ``seed`` and, with
        ``hf_source``, loaded from it (``initialize=False`` leaves them uninitialized)."""
        # Fused-kernel defaults of the strategy's fast path; the model's ``extra`` fields win.
        kernels = {k: v for k, v in strategy.kernel_config_kwargs().items() if k not in self.config.extra}
        if self.hparams.packed_format == "thd" and not strategy.use_te:
            # The compiled RoPE covers [s, b, h, d] tensors; packed THD rows keep Megatron's own.
            kernels.pop("apply_rope_fusion", None)
        tconfig = self.config.to_transformer_config(**kernels, **strategy.transformer_config_kwargs())
        if tconfig.num_moe_experts:
            # Megatron's process-wide aux-loss tracker sizes its per-layer values by the layer
            # count of the first MoE model that logged into it; another model's layers would
            # index past them.
            from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

            get_moe_layer_wise_logging_tracker().clear()
        tp = ps.get_tensor_model_parallel_world_size()
        vpp = strategy.parallel.vpp or 1
        chunks = []
        for stage in range(vpp):
            vp_stage = stage if vpp > 1 else None
            chunks.append(
                _GPTModel(
                    fused_loss=strategy.fused_kernels,
                    sorted_dispatch=strategy.fused_kernels,
                    tensor_core_router=strategy.fused_kernels,
                    embedding_grads_into_main_grad=strategy.fused_kernels,
                    cuda_graphs=strategy.use_cuda_graphs(tconfig),
                    grads_into_main_grad=not strategy.overlap_grad_reduce,
                    config=tconfig,
                    transformer_layer_spec=block_spec(
                        tconfig,
                        strategy.use_te,
                        vp_stage,
                        grouped_experts=strategy.fused_kernels,
                        compiled_norm=strategy.fused_kernels,
                        fused_shared_gate=strategy.fused_kernels,
                        fused_qkv=strategy.fused_kernels,
                    ),
                    vocab_size=self.config.padded_vocab_size(tp),
                    max_sequence_length=self.config.max_position_embeddings,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    share_embeddings_and_output_weights=self.config.tie_word_embeddings,
                    position_embedding_type="rope",
                    rotary_base=int(self.config.rope_theta),
                    **_rope_scaling(self.config),
                    vp_stage=vp_stage,
                )
            )
        if initialize:
            init_weights(chunks, self.hparams.seed, self.config.init_method_std, self.config.num_layers)
            if self.hparams.hf_source:
                from lightning_megatron.hf import load_hf_weights

                load_hf_weights(chunks, self.hparams.hf_source, self.config)
        return chunks

    @classmethod
    def from_hf(cls, source: str | Path, **kwargs: Any) -> GPTModule:
        """A module with a Hugging Face model's config and weights.

        The weights load in ``configure_model``, under whatever layout the strategy has; each rank
        reads only its own layers' and experts' tensors. ``kwargs`` go to ``GPTModule``
        (``lr=...``), and config fields to override go in ``config_overrides``.
        """
        overrides = kwargs.pop("config_overrides", {})
        config = GPTConfig.from_hf(source)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(config, hf_source=str(source), **kwargs)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10**9
        scheduler = warmup_decay_lr(optimizer, hp.warmup_steps, total, hp.lr_decay, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------- the Megatron contract
    def forward_step(self, data_iterator: Iterator[dict[str, Tensor]], chunk: torch.nn.Module):
        """One microbatch through one model chunk: Megatron's ``forward_step_func`` contract.

        Returns the chunk's output (per-token losses on the last pipeline stage, hidden states
        elsewhere) and the function that reduces it to ``(loss_sum, num_tokens, report)``.
        """
        batch = next(data_iterator)
        thd = "segment_ids" in batch and self.thd_packing
        if thd and ps.get_pipeline_model_parallel_world_size() > 1 and batch["input_ids"].shape[0] > 1:
            raise ValueError(
                "packed rows in THD format make one [b*s, 1, h] sequence of each microbatch, but pipeline "
                "stages exchange [s, micro_batch_size, h] activations; with pp>1 set micro_batch_size=1 "
                f"(it is {batch['input_ids'].shape[0]})"
            )
        if thd and ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError(
                "packed rows with context parallelism need cu_seqlens padded per CP rank, not supported yet; "
                "set cp=1 or packing=False"
            )
        inputs = prepare_inputs(batch, thd=thd)
        output = chunk(
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["attention_mask"],
            labels=inputs["labels"],
            packed_seq_params=inputs["packed_seq_params"],
        )
        if self.objective is not None:
            return output, self.objective(batch, inputs)
        return output, partial(masked_token_loss, inputs["loss_mask"])

    @property
    def thd_packing(self) -> bool:
        """Whether packed rows run in THD format (see ``packed_format``)."""
        fmt = self.hparams.packed_format
        return fmt == "thd" or (fmt == "auto" and self.trainer.strategy.use_te)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        metrics = self.trainer.strategy.forward_backward(batch)
        self.log("train/loss", metrics["loss"], prog_bar=True, batch_size=_batch_size(batch))
        for name, value in metrics.items():
            if name not in ("loss", "num_tokens"):
                self.log(f"train/{name}", value, batch_size=_batch_size(batch))
        self.log_moe_losses()
        return metrics["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = self.trainer.strategy.optimizers[0]
        if getattr(optimizer, "last_grad_norm", None) is not None:
            self.log("train/grad_norm", optimizer.last_grad_norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        metrics = self.trainer.strategy.forward_backward(batch, forward_only=True)
        # Token-weighted over the epoch: Lightning's weighted mean with num_tokens as weight.
        n = int(metrics["num_tokens"].item())
        self.log("val/loss", metrics["loss"], batch_size=max(n, 1), sync_dist=False, prog_bar=True)
        for name, value in metrics.items():
            if name not in ("loss", "num_tokens"):
                self.log(f"val/{name}", value, batch_size=max(n, 1))
        return metrics["loss"]

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Full-vocabulary logits ``[b, s, vocab]`` for the batch (every rank gets them)."""
        return self.trainer.strategy.forward_logits(batch)

    def log_moe_losses(self) -> None:
        if not self.config.is_moe:
            return
        for name, value in moe_losses(self.config.num_layers).items():
            self.log(f"train/{name}", value)

    # ---------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Greedy (``temperature=0``) or sampled decoding; ``input_ids`` ``[b, s]`` -> ``[b, s + n]``.

        Works under TP/EP (no pipeline parallelism). No KV cache: each new token reruns the
        prefix, which is fine for the short samples this is meant for.
        """
        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("generate() runs without pipeline parallelism; use pp=1")
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        chunk = self.chunks[0]
        was_training = chunk.training
        chunk.eval()
        tokens = input_ids
        for _ in range(max_new_tokens):
            logits = self.full_logits(chunk, tokens)[:, -1, : self.config.vocab_size].float()
            if temperature <= 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            # Every tensor-parallel rank must continue with the same token.
            torch.distributed.broadcast(
                next_token,
                src=ps.get_tensor_model_parallel_src_rank(),
                group=ps.get_tensor_model_parallel_group(),
            )
            tokens = torch.cat([tokens, next_token.to(tokens.dtype)], dim=1)
            if eos_token_id is not None and bool((next_token == eos_token_id).all()):
                break
        chunk.train(was_training)
        return tokens

    def full_logits(self, chunk: torch.nn.Module, input_ids: Tensor) -> Tensor:
        """Logits over the whole (padded) vocabulary, gathered from the tensor-parallel ranks."""
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        logits = chunk(input_ids, position_ids, None)
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


class _GPTModel(GPTModel):
    """Megatron-Core's ``GPTModel`` with the fast path's switches:

    - ``fused_loss``: our :func:`~lightning_megatron.models.kernels.vocab_parallel_cross_entropy`
      (bf16 logits stay bf16);
    - ``sorted_dispatch``: MoE layers route through :func:`~lightning_megatron.models.moe.use_sorted_dispatch`
      where no token leaves the rank;
    - ``tensor_core_router``: fp32 router logits from bf16 tensor-core GEMMs
      (:func:`~lightning_megatron.models.moe.use_tensor_core_router`);
    - ``embedding_grads_into_main_grad``: the word embedding's gradient rows go straight into
      ``main_grad`` (:func:`~lightning_megatron.models.kernels.use_embedding_grads_into_main_grad`);
    - ``cuda_graphs``: transformer layers train as CUDA graphs
      (:func:`~lightning_megatron.models.graphs.use_layer_graphs`).
    """

    def __init__(
        self,
        *args: Any,
        fused_loss: bool = False,
        sorted_dispatch: bool = False,
        tensor_core_router: bool = False,
        embedding_grads_into_main_grad: bool = False,
        cuda_graphs: bool = False,
        grads_into_main_grad: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        if sorted_dispatch:
            use_sorted_dispatch(self)
        if tensor_core_router:
            use_tensor_core_router(self)
        if embedding_grads_into_main_grad and self.pre_process:
            use_embedding_grads_into_main_grad(self)
        if cuda_graphs:
            use_layer_graphs(self, grads_into_main_grad)

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        if not self.fused_loss:
            return super().compute_language_model_loss(labels, logits)
        # labels [b, s], logits [s, b, vocab/tp] -> per-token loss [b, s]
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


def prepare_inputs(batch: dict[str, Tensor], thd: bool = False) -> dict[str, Any]:
    """Shift labels (transformers convention), build the loss mask and positions.

    With ``thd`` and packed rows (``segment_ids``), the microbatch's rows are laid end to end as
    one ``[1, b*s]`` sequence described by ``packed_seq_params`` instead of an attention mask.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    # Predict token t+1 at position t; the last position has no target.
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    loss_mask = shifted != -100
    if "loss_mask" in batch:
        loss_mask &= torch.roll(batch["loss_mask"].bool(), -1, dims=1)
    attention_mask = packed = None
    padding = batch.get("attention_mask")
    segments = batch.get("segment_ids")
    if segments is not None:
        # Packed rows: a token sees only earlier tokens of its own sample, and the last token of
        # a sample does not learn to predict the next sample's first token.
        loss_mask &= (torch.roll(segments, -1, dims=1) == segments) & (segments > 0)
        if thd:
            packed = packed_seq_params(segments)
        else:
            attention_mask = _segment_mask(segments)
    elif padding is not None and not bool(padding.all()):
        loss_mask &= torch.roll(padding.bool(), -1, dims=1)
        attention_mask = _causal_padding_mask(padding.bool())
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # Megatron's vocab-parallel cross entropy needs valid ids everywhere; masked ones are ignored.
    inputs = dict(
        input_ids=input_ids,
        labels=shifted.clamp(min=0),
        loss_mask=loss_mask,
        position_ids=position_ids,
        attention_mask=attention_mask,
    )
    if packed is not None:
        inputs = {key: None if value is None else value.reshape(1, -1) for key, value in inputs.items()}
    inputs["packed_seq_params"] = packed
    return inputs


def packed_seq_params(segments: Tensor) -> PackedSeqParams:
    """Megatron's THD ``PackedSeqParams`` for packed rows ``segments`` ``[b, s]`` (1, 2, ... per
    sample, 0 for padding) laid end to end as one sequence of ``b*s`` tokens.

    Each run of one segment id within a row is a sequence; a padding run is one too, so
    ``cu_seqlens`` covers every token (padding attends only to padding and carries no loss).
    Example: ``[[1, 1, 1, 2, 2, 0]]`` -> ``cu_seqlens [0, 3, 5, 6]``, ``max_seqlen 3``.
    """
    flat = segments.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segments.shape[1]] = True  # every row starts a sequence, even with equal ids
    end = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([starts.nonzero().flatten(), end]).to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def _causal_padding_mask(valid: Tensor) -> Tensor:
    """``[b, 1, s, s]`` mask, True where attention is *not* allowed (Megatron's convention)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & valid[:, None, None, :]
    # A padding query that may see nothing would give NaN; let every token see itself.
    allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)
    return ~allowed


def _segment_mask(segments: Tensor) -> Tensor:
    """``[b, 1, s, s]`` block-diagonal causal mask of packed samples (True = not allowed)."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (segments[:, None, :, None] == segments[:, None, None, :])
    allowed |= torch.eye(s, dtype=torch.bool, device=segments.device)
    return ~allowed


def masked_token_loss(loss_mask: Tensor, per_token_loss: Tensor):
    """``(loss_sum, num_tokens, report)``: Megatron's per-token-loss contract."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}


def moe_losses(num_layers: int) -> dict[str, Tensor]:
    """Mean (over layers) MoE auxiliary losses recorded since the last call, reduced over ranks."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    reduce_aux_losses_tracker_across_ranks()
    tracker = get_moe_layer_wise_logging_tracker()
    losses = {name: entry["values"].float().sum() / num_layers for name, entry in tracker.items()}
    clear_aux_losses_tracker()
    return losses


def _rope_scaling(config: GPTConfig) -> dict[str, Any]:
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": float(scaling.get("factor", 8.0))}
    if scaling:
        raise ValueError(f"rope_scaling {scaling} is not supported; supported: llama3")
    return {}


def _batch_size(batch: dict[str, Tensor]) -> int:
    return int(batch["input_ids"].shape[0])
