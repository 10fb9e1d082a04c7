"""Megatron's (distributed) optimizer behind Lightning's optimizer API.

``configure_optimizers`` returns what Lightning users already write: a ``torch.optim.AdamW`` (or
``Adam``/``SGD``), optionally with any torch LR scheduler, or a Megatron ``OptimizerConfig``. The
strategy reads the hyperparameters, builds Megatron-Core's optimizer over the model chunks, and
hands Lightning a :class:`MegatronOptimizer` whose ``param_groups`` *are* the user optimizer's
groups: schedulers and ``LearningRateMonitor`` keep working on them, and every step copies the
current ``lr``/``weight_decay`` into Megatron's own groups (times their ``lr_mult``/``wd_mult``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from torch.optim.lr_scheduler import LambdaLR


def optimizer_config_from(optimizer: torch.optim.Optimizer | OptimizerConfig) -> OptimizerConfig:
    """Megatron ``OptimizerConfig`` carrying a torch optimizer's hyperparameters."""
    if isinstance(optimizer, OptimizerConfig):
        return optimizer
    groups = optimizer.param_groups
    if len(groups) != 1:
        raise ValueError(
            f"{type(optimizer).__name__} has {len(groups)} parameter groups; MegatronStrategy "
            "carries over one group (Megatron makes its own weight-decay groups). Return a single "
            "group, or a megatron.core.optimizer.OptimizerConfig"
        )
    group = groups[0]
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        if type(optimizer) is torch.optim.Adam and group["weight_decay"]:
            raise ValueError(
                "torch.optim.Adam with weight_decay uses L2 regularization, but Megatron's Adam "
                "decays weights decoupled (AdamW); use torch.optim.AdamW instead"
            )
        beta1, beta2 = group["betas"]
        return OptimizerConfig(
            optimizer="adam",
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            adam_beta1=beta1,
            adam_beta2=beta2,
            adam_eps=group["eps"],
            # Only used under fp16: torch's GradScaler starts at 2**16; Megatron's default,
            # 2**32, skips the first ~16 steps on overflow before it gets there.
            initial_loss_scale=2.0**16,
        )
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("nesterov") or group.get("dampening"):
            raise ValueError("Megatron's SGD has no nesterov/dampening; set them to False/0")
        return OptimizerConfig(
            optimizer="sgd",
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            sgd_momentum=group["momentum"],
            initial_loss_scale=2.0**16,
        )
    raise TypeError(
        f"MegatronStrategy builds Megatron-Core's optimizer and can carry over torch.optim.AdamW, "
        f"Adam and SGD, not {type(optimizer).__name__}; return one of those or a "
        "megatron.core.optimizer.OptimizerConfig from configure_optimizers"
    )


def build_megatron_optimizer(
    config: OptimizerConfig,
    chunks: Sequence[torch.nn.Module],
    **overrides: Any,
):
    """Megatron-Core's optimizer over the (DDP-wrapped) model chunks."""
    return get_megatron_optimizer(replace(config, **overrides), list(chunks))


def use_fused_adam(optimizer: Any) -> bool:
    """Run the torch AdamW inside a Megatron optimizer with torch's fused CUDA kernel.

    Without TE or Apex, Megatron-Core builds ``torch.optim.AdamW`` with its default multi-tensor
    (foreach) implementation: several kernels per tensor list, each reading and writing the fp32
    master weights and Adam states again. The fused kernel does the whole update in one pass
    (on the dense benchmark shape 45 -> about 15 ms per step). Its step counters live on the
    device, so existing states' counters move there. Idempotent: loading a checkpoint restores
    the saved ``fused``/``foreach`` flags and CPU counters, and this is applied again after it.
    Returns whether any optimizer was switched (only Adam(W) whose parameters are all on CUDA).
    """
    switched = False
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in torch_optimizer.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cuda" for p in params):
            continue
        for group in torch_optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
        for param, state in torch_optimizer.state.items():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device, torch.float32)
        switched = True
    return switched


def prime_optimizer_state(optimizer: Any) -> None:
    """Create the (zero) Adam state of a Megatron optimizer that has not stepped yet.

    Loading a checkpoint needs the state's structure to load into; Megatron's distributed
    optimizer reads the step count off it and, with torch's Adam (no Apex/TE fused Adam), finds
    none before the first step.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init_state_fn = getattr(inner, "init_state_fn", None)
        torch_optimizer = getattr(inner, "optimizer", None)
        if init_state_fn is None or torch_optimizer is None or len(torch_optimizer.state):
            continue
        init_state_fn(torch_optimizer, getattr(inner, "config", None))
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                # torch keeps fused Adam's step counters on the device, the others' on the CPU.
                device = param.device if group.get("fused") else "cpu"
                torch_optimizer.state[param].setdefault("step", torch.tensor(0.0, device=device))


class MegatronOptimizer(torch.optim.Optimizer):
    """Lightning-facing view of a Megatron-Core optimizer.

    ``step()`` runs Megatron's step (gradient unscale, inf/nan check and skip, clipping, grad norm,
    the distributed-optimizer all-gather). The last grad norm and whether the step was skipped are
    kept on ``last_grad_norm`` / ``last_step_skipped``.
    """

    def __init__(self, megatron_optimizer, param_groups: list[dict[str, Any]], fused_adam: bool = False) -> None:
        # torch.optim.Optimizer.__init__ wants parameters to own; this object owns none, so only
        # the attributes schedulers and Lightning read are set.
        self.megatron = megatron_optimizer
        self.param_groups = param_groups
        self.defaults = {k: v for k, v in param_groups[0].items() if k != "params"}
        self.state: dict[Any, Any] = {}
        self._optimizer_step_pre_hooks: dict[int, Callable] = {}
        self._optimizer_step_post_hooks: dict[int, Callable] = {}
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = {}
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = {}
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = {}
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = {}
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        self.fused_adam = fused_adam and use_fused_adam(megatron_optimizer)

    def _sync_hyperparameters(self) -> None:
        lr = self.param_groups[0]["lr"]
        weight_decay = self.param_groups[0].get("weight_decay", 0.0)
        for group in self.megatron.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        success, grad_norm, _ = self.megatron.step()
        self.last_step_skipped = not success
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        self._opt_called = True  # read by torch LR schedulers' "step order" check
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Lightning calls zero_grad *between* training_step and backward; with Megatron the
        # backward already ran inside training_step, so the strategy zeroes the gradient buffers
        # itself at the start of each step instead.
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.megatron.state_dict()

    @torch.no_grad()  # copies into main params, which for fp32 training are the model's own
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = list(getattr(self.megatron, "chained_optimizers", [self.megatron]))
        part_states = [state_dict] if len(parts) == 1 else [state_dict[k] for k in sorted(state_dict)]
        steps = [_saved_step(part_state) for part_state in part_states]
        self.megatron.load_state_dict(state_dict)
        # With torch's Adam, Megatron's distributed optimizer keeps the step count in the param
        # groups and hands every parameter one *shared* step tensor on load (torch would then
        # increment it once per parameter), and its dp_reshardable loader can overwrite it with
        # the template's value. Give each parameter its own tensor holding the saved step.
        for part, step in zip(parts, steps, strict=True):
            for state in getattr(getattr(part, "optimizer", None), "state", {}).values():
                if step is not None and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)
        if self.fused_adam:
            use_fused_adam(self.megatron)


def _saved_step(state_dict: dict[str, Any]) -> float | None:
    groups = state_dict.get("optimizer", {}).get("param_groups", []) if isinstance(state_dict, dict) else []
    steps = {float(g["step"]) for g in groups if g.get("step") is not None}
    return steps.pop() if len(steps) == 1 else None


def warmup_decay_lr(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: Literal["cosine", "linear", "constant"] = "cosine",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine/linear decay to ``min_lr_ratio * lr``.

    Example::

        scheduler = warmup_decay_lr(optimizer, warmup_steps=100, total_steps=10_000)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay={decay!r}; choose 'cosine', 'linear' or 'constant'")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} >= 1")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return LambdaLR(optimizer, factor)
