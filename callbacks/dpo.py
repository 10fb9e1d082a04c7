"""DPO: preference training of a GPTModule, with a frozen, sharded reference model or LoRA's base."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_megatron import schedule
from lightning_megatron.dpo import DPOConfig, dpo_loss_func, pairs_to_rows, sequence_logps
from lightning_megatron.lora import adapters_disabled


class DPO(L.Callback):
    """Turn a GPTModule's objective into DPO (Megatron-SWIFT's / TRL's options).

    Batches are preference pairs (:class:`~lightning_megatron.data.PreferenceDataModule`); the
    chosen and rejected rows of a pair run in the same microbatch, so ``micro_batch_size`` counts
    rows and must be even (2 = one pair per microbatch).

    The reference model is, by default, a frozen copy of the starting policy sharded like it; with
    ``ref_load``, the weights of that checkpoint; with the LoRA callback, the policy with its
    adapters switched off (no second copy). Reference log-probs are computed once per batch, in
    a forward-only pass without autograd.

    Args:
        beta, loss_type (``sigmoid``, ``hinge``, ``ipo``, ``robust``), label_smoothing, rpo_alpha,
        reference_free: see :mod:`lightning_megatron.dpo`.
        ref_load: a torch_dist checkpoint of the same architecture to use as the reference.

    Logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (and ``nll`` with ``rpo_alpha``),
    under ``train/`` and ``val/``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        reference_free: bool = False,
        ref_load: str | Path | None = None,
    ) -> None:
        self.config = DPOConfig(beta, loss_type, label_smoothing, rpo_alpha, reference_free)
        self.ref_load = ref_load
        self.reference: list[torch.nn.Module] | None = None  # the frozen copy, when there is one
        self.uses_lora = False

    # ------------------------------------------------------------------------------ setup
    def configure_megatron_model(
        self, trainer: L.Trainer, module: L.LightningModule, chunks: Sequence[torch.nn.Module]
    ) -> None:
        """Called by MegatronStrategy after ``configure_model`` (and LoRA), before the Megatron wrappers."""
        strategy = trainer.strategy
        mbs = strategy.parallel.micro_batch_size
        if mbs % 2:
            raise ValueError(
                f"DPO runs the chosen and rejected rows of a pair in one microbatch: micro_batch_size={mbs} "
                "must be even (2 = one pair per microbatch)"
            )
        module.objective = self.objective
        from lightning_megatron.callbacks.lora import LoRA

        self.uses_lora = any(isinstance(c, LoRA) for c in trainer.callbacks)
        if self.config.reference_free or self.uses_lora:
            if self.ref_load is not None:
                raise ValueError(
                    "DPO ref_load cannot be combined with "
                    + (
                        "reference_free=True"
                        if self.config.reference_free
                        else "LoRA (the reference is the base model)"
                    )
                )
            return
        if self.reference is None:
            self.reference = self._build_reference(strategy, module, chunks)

    def _build_reference(self, strategy, module, chunks) -> list[torch.nn.Module]:
        reference = module.build_chunks(strategy, initialize=False)
        if self.ref_load is None:
            for ref, policy in zip(reference, chunks, strict=True):  # the starting policy
                ref.load_state_dict(policy.state_dict())
        else:
            _load_reference(strategy, reference, self.ref_load)
        for chunk in reference:
            chunk.requires_grad_(False)
            chunk.eval()
        reference = strategy._wrap_precision([chunk.to(strategy.root_device) for chunk in reference])
        count = sum(p.numel() for chunk in reference for p in chunk.parameters())
        rank_zero_info(f"DPO: reference model with {count:,} parameters on rank 0 (frozen)")
        return reference

    # ---------------------------------------------------------------------------- batches
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._prepare(trainer, batch)

    def on_validation_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._prepare(trainer, batch)

    def _prepare(self, trainer: L.Trainer, batch: dict[str, torch.Tensor]) -> None:
        """Lay the pairs out as rows and attach the reference log-probs (in place: the same batch
        object goes on to ``training_step``)."""
        if "reference_logps" in batch:
            return
        rows = pairs_to_rows(batch)
        rows["reference_logps"] = self.reference_logps(trainer.strategy, trainer.lightning_module, rows)
        batch.clear()
        batch.update(rows)

    @torch.no_grad()
    def reference_logps(self, strategy, module: L.LightningModule, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-row response log-prob sums under the reference model (the last pipeline stage has
        them; other stages hold zeros, which they never read). The pass runs the module's own
        ``forward_step`` (the same inputs as training) with an objective that collects them."""
        size = rows["input_ids"].shape[0]
        logps = torch.zeros(size, dtype=torch.float32, device=rows["input_ids"].device)
        if self.config.reference_free:
            return logps
        chunks = strategy.chunks if self.reference is None else self.reference
        off = adapters_disabled(chunks) if self.uses_lora else contextlib.nullcontext()
        module.objective = _collect_logps
        try:
            with off:
                reports = schedule._run_schedule(
                    module.forward_step, chunks, rows, strategy.parallel.micro_batch_size, forward_only=True
                )
        finally:
            module.objective = self.objective
        if reports:
            logps.copy_(torch.cat([r["logps"] for r in reports]))
        return logps

    def objective(self, microbatch: dict[str, torch.Tensor], inputs: dict[str, Any]):
        """GPTModule's loss hook: the DPO loss of this microbatch's pairs."""
        return partial(dpo_loss_func, self.config, inputs["loss_mask"], microbatch["reference_logps"])

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        module.objective = None
        self.reference = None


def _collect_logps(microbatch: dict[str, torch.Tensor], inputs: dict[str, Any]):
    """An objective for a forward-only pass: reports each row's response log-prob sum."""

    def collect(per_token_loss):
        logps, _ = sequence_logps(per_token_loss, inputs["loss_mask"])
        return per_token_loss.sum() * 0, torch.ones((), dtype=torch.int, device=logps.device), {"logps": logps}

    return collect


def _load_reference(strategy, reference: list[torch.nn.Module], path: str | Path) -> None:
    from lightning_megatron.checkpoint import CheckpointError, read_info

    info = read_info(path)
    strategy._check_same_model(info, path)  # a different architecture is refused, field by field
    if info.get("partial_model"):
        raise CheckpointError(f"ref_load={str(path)!r} holds LoRA adapters only; pass a full checkpoint")
    if "lora" in info:  # its weights without the adapters are not the model that run trained
        raise CheckpointError(f"ref_load={str(path)!r} was saved with LoRA; merge it first (merge_lora_to_hf)")
    strategy.load_weights(path, chunks=reference)
