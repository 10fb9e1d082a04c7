"""LoRA: train low-rank adapters on Megatron's tensor-parallel linears (Megatron-SWIFT's train_type lora)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_megatron.callbacks.freeze import _global_names
from lightning_megatron.lora import LoRAConfig, add_lora, collective_device, is_adapter_key
from lightning_megatron.models.moe import unstack_experts

# Hugging Face names users know for the modules outside the layers.
_MODULE_ALIASES = {
    "embed_tokens": "embedding.word_embeddings",
    "lm_head": "output_layer",
    "norm": "decoder.final_layernorm",
}


class LoRA(L.Callback):
    """Add LoRA adapters before Megatron wraps the model; train only them (and ``modules_to_save``).

    Frozen weights get no gradient buffer and no optimizer state. Checkpoints hold the adapters
    only (``adapter_only_checkpoint``): resume with the same base model and this callback, e.g.
    ``trainer.fit(GPTModule.from_hf(base), ckpt_path=adapter_checkpoint)``.

    Args:
        r, alpha, dropout, target_modules, target_regex, use_rslora, init, seed: see
            :class:`~lightning_megatron.lora.LoRAConfig`.
        modules_to_save: also train (and save) these, fully: Megatron name prefixes
            (``output_layer``, ``embedding``, ``decoder.final_layernorm``) or ``lm_head``,
            ``embed_tokens``, ``norm``.
        base_load: a torch_dist checkpoint (full, saved without LoRA) holding the base weights,
            loaded before anything else (Megatron-SWIFT's ``--load``); not needed when the module
            comes from ``GPTModule.from_hf``.
        adapter_load: start from the adapters of this checkpoint (weights only; the optimizer,
            schedule and step start fresh). To resume a run, pass ``ckpt_path`` to ``fit`` instead.
        adapter_only_checkpoint: save adapters (and ``modules_to_save``) only; ``False`` saves
            the base weights too.

    Example::

        Trainer(strategy=MegatronStrategy(tp=2), callbacks=[LoRA(r=8, alpha=32, target_modules="all-linear")])
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 32.0,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        target_regex: str | None = None,
        modules_to_save: Sequence[str] = (),
        use_rslora: bool = False,
        init: str = "kaiming",
        seed: int = 42,
        base_load: str | Path | None = None,
        adapter_load: str | Path | None = None,
        adapter_only_checkpoint: bool = True,
    ) -> None:
        self.config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            target_regex=target_regex,
            use_rslora=use_rslora,
            init=init,
            seed=seed,
        )
        self.modules_to_save = tuple(_MODULE_ALIASES.get(name, name) for name in modules_to_save)
        self.base_load, self.adapter_load = base_load, adapter_load
        self.adapter_only_checkpoint = adapter_only_checkpoint

    def trainable(self, key: str) -> bool:
        """Whether a parameter / checkpoint key is trained (and saved) under this callback."""
        return is_adapter_key(key) or key.startswith(self.modules_to_save or ("\0",))

    def configure_megatron_model(
        self, trainer: L.Trainer, module: L.LightningModule, chunks: Sequence[torch.nn.Module]
    ) -> None:
        """Called by MegatronStrategy after ``configure_model``, before the Megatron wrappers."""
        # Expert adapters wrap one linear per expert: stacked experts go back to per-expert ones.
        unstack_experts(chunks)
        wrapped = add_lora(chunks, self.config)
        trainable = total = 0
        matched_to_save = set()
        for name, param in _global_names(chunks):
            keep = self.trainable(name)
            param.requires_grad_(keep)
            matched_to_save.update(p for p in self.modules_to_save if name.startswith(p))
            total += param.numel()
            trainable += param.numel() if keep else 0
        _check_modules_to_save(self.modules_to_save, matched_to_save, chunks)
        strategy = trainer.strategy
        saved_with = {
            "modules_to_save": list(self.modules_to_save),
            "base_load": self.base_load and str(self.base_load),
        }
        strategy.checkpoint_info_extras["lora"] = self.config.to_dict() | saved_with
        strategy.model_state_filter = self.trainable if self.adapter_only_checkpoint else None
        if self.base_load is not None:
            load_weights(strategy, self.base_load, adapters=False)
        if self.adapter_load is not None:
            load_weights(strategy, self.adapter_load, adapters=True)
        rank_zero_info(
            f"LoRA r={self.config.r} alpha={self.config.alpha} on {len(wrapped)} linears: {trainable:,} of "
            f"{total:,} parameters trainable on rank 0 ({100 * trainable / max(total, 1):.2f}%)"
        )


def _check_modules_to_save(wanted: Sequence[str], matched: set[str], chunks: Sequence[torch.nn.Module]) -> None:
    # A prefix may live on another pipeline stage only; decide over all ranks.
    missing = torch.tensor([int(p not in matched) for p in wanted], dtype=torch.int64, device=collective_device())
    if torch.distributed.is_initialized() and len(wanted):
        torch.distributed.all_reduce(missing, op=torch.distributed.ReduceOp.MIN)
    absent = [p for p, m in zip(wanted, missing.tolist(), strict=True) if m]
    if absent:
        names = sorted({n.split(".layers.")[0] + ".layers" if ".layers." in n else n for n, _ in _global_names(chunks)})
        raise ValueError(f"LoRA modules_to_save {absent} match no parameter; top-level names: {names}")


def load_weights(strategy, path: str | Path, adapters: bool) -> None:
    """Copy the adapters (and modules_to_save) of a LoRA checkpoint, or the base weights of a
    checkpoint saved without LoRA, into the model in place (weights only)."""
    from lightning_megatron.checkpoint import CheckpointError, read_info

    info = read_info(path)
    if adapters != ("lora" in info):
        what = "holds no LoRA adapters" if adapters else "holds LoRA adapters, not base weights"
        option = "adapter_load" if adapters else "base_load"
        raise CheckpointError(
            f"{option}={str(path)!r} {what}; pass a checkpoint saved {'with' if adapters else 'without'} LoRA"
        )
    strategy.load_weights(path, keep=strategy._saved_model_keys(info, path))
    rank_zero_info(f"LoRA: {'adapters' if adapters else 'base weights'} loaded from {path}")
