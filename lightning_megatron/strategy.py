"""MegatronStrategy: Megatron-Core parallelism inside an ordinary Lightning Trainer.

The setup reads as a recipe (each step a named method):

1. ``setup_environment``: precision plugin -> (CPU mode) -> process group -> Megatron parallel
   state -> model-parallel RNG.
2. Lightning calls the module's ``configure_model``: it builds this rank's Megatron model chunks.
3. ``setup``: move to device -> 16-bit wrapper -> Megatron DDP -> Megatron optimizer -> schedule hooks.
4. Each training step: the module's ``training_step`` calls :meth:`forward_backward`, which runs
   Megatron's pipeline schedule over all microbatches (forward *and* backward); Lightning's own
   backward is then a no-op and ``optimizer_step`` runs Megatron's optimizer.
5. ``teardown``: unwrap the chunks and free the CUDA graphs; on NCCL, Megatron's process groups
   are kept for the next ``fit`` with the same layout (on gloo they are destroyed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch.core.optimizer import (
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
    _validate_scheduler_api,
)
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.experts import SequentialMLP
from torch import Tensor

from lightning_megatron import schedule
from lightning_megatron.checkpoint import FORMAT, CheckpointError, MegatronCheckpointIO, read_info
from lightning_megatron.cpu import cpu_mode
from lightning_megatron.lora import is_adapter_key
from lightning_megatron.models.config import RecomputeConfig
from lightning_megatron.models.graphs import layer_graphs_supported, release_layer_graphs
from lightning_megatron.models.kernels import kernel_config_kwargs, limit_wgrad_fusion
from lightning_megatron.models.moe import StackedExperts
from lightning_megatron.models.specs import te_available
from lightning_megatron.optim import (
    MegatronOptimizer,
    build_megatron_optimizer,
    optimizer_config_from,
    prime_optimizer_state,
)
from lightning_megatron.parallel import ParallelConfig
from lightning_megatron.precision import MegatronPrecision
from lightning_megatron.resume import ResumableLoader, rng_state, set_rng_state


class MegatronStrategy(DDPStrategy):
    """Train with Megatron-Core tensor, pipeline, context, expert, sequence and data parallelism.

    Args:
        tp, pp, vpp, cp, ep, etp, sp, micro_batch_size: the parallel layout (see
            :class:`~lightning_megatron.ParallelConfig`). The DataLoader's batch size is the
            data-parallel-local batch; it is split into ``micro_batch_size`` microbatches.
        use_distributed_optimizer: shard optimizer state over data-parallel ranks (ZeRO-1).
        overlap_grad_reduce, overlap_param_gather: overlap gradient reduce-scatter / parameter
            all-gather with compute (Megatron DDP).
        recompute: activation recompute, e.g. ``RecomputeConfig("full", "uniform", 1)``.
        fp8: ``"hybrid"`` or ``"e4m3"`` FP8 training; needs Transformer Engine.
        use_te: use Transformer Engine layers; default: when importable and on GPU.
        fused_kernels: the fast path without TE or apex (see ``lightning_megatron.models.kernels``):
            a cross entropy that keeps the logits in bf16, MoE experts as grouped GEMMs and a
            sync-free MoE token dispatcher on any device; on GPU also compiled RoPE and SwiGLU,
            weight gradients accumulated into the fp32 main grads by the GEMM, and torch's fused
            AdamW kernel. ``False`` runs Megatron's plain eager ops (debugging, comparison);
            ``GPTConfig(extra={...})`` overrides single ``TransformerConfig`` fields.
        cuda_graphs: train each transformer layer as a CUDA graph (forward and backward captured on
            the first step; see ``lightning_megatron.models.graphs``), which takes the host's
            kernel launches out of the step. Default: with ``fused_kernels`` wherever it applies
            (CUDA, no TE, tp = pp = cp = ep = 1, no recompute or dropout); ``True`` raises where
            it does not.
        seed: model-parallel RNG seed (dropout); default: ``seed_everything``'s seed or 1234.
        ddp_config: extra ``DistributedDataParallelConfig`` fields.
        checkpoint_io: a :class:`~lightning_megatron.MegatronCheckpointIO` with save/load options
            (async save, no_save_optim, finetune, ...); the default saves everything synchronously.
        start_method: ``"popen"`` (re-run the script, Lightning's default), ``"spawn"`` or
            ``"fork"`` (notebooks).

    Example::

        trainer = L.Trainer(strategy=MegatronStrategy(tp=2, pp=2), devices=4, precision="bf16-mixed")
    """

    strategy_name = "megatron"

    def __init__(
        self,
        tp: int = 1,
        pp: int = 1,
        vpp: int | None = None,
        cp: int = 1,
        ep: int = 1,
        etp: int | None = None,
        sp: bool = False,
        micro_batch_size: int = 1,
        use_distributed_optimizer: bool = True,
        overlap_grad_reduce: bool = False,
        overlap_param_gather: bool = False,
        recompute: RecomputeConfig | None = None,
        fp8: Literal["hybrid", "e4m3"] | None = None,
        use_te: bool | None = None,
        fused_kernels: bool = True,
        cuda_graphs: bool | None = None,
        seed: int | None = None,
        ddp_config: dict[str, Any] | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            start_method=start_method, process_group_backend=process_group_backend, timeout=timeout, **kwargs
        )
        self.parallel = ParallelConfig(tp, pp, vpp, cp, ep, etp, sp, micro_batch_size)
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather
        self.recompute = recompute or RecomputeConfig()
        self.fp8 = fp8
        self._use_te = use_te
        self.fused_kernels = fused_kernels
        self.cuda_graphs = cuda_graphs
        self.seed = seed
        self.ddp_config_overrides = dict(ddp_config or {})
        self._cpu_mode: contextlib.AbstractContextManager | None = None
        self._bare_chunks: list[torch.nn.Module] | None = None
        self._batch_idx = 0  # index of the training batch in flight, within the epoch
        self._epoch_batches_done = 0  # training batches finished this epoch (the data position)
        self.consumed_samples = 0  # global samples trained on, over the whole run
        self._restore_optimizer = True
        self._strict_model_load = True
        # Set by callbacks that change what a checkpoint holds (LoRA: adapter-only checkpoints).
        self.model_state_filter: Callable[[str], bool] | None = None
        self.checkpoint_info_extras: dict[str, Any] = {}
        if fp8 is not None and not te_available():
            raise ValueError(
                f"fp8={fp8!r} needs Transformer Engine, which is not importable; install it "
                "(pip install 'lightning-megatron[te]') or set fp8=None"
            )

    # ------------------------------------------------------------------------------ properties
    @property
    def use_te(self) -> bool:
        on_gpu = self.root_device.type == "cuda"
        if self._use_te is None:
            return on_gpu and te_available()
        if self._use_te and not (on_gpu and te_available()):
            raise ValueError("use_te=True needs Transformer Engine and a GPU; set use_te=None")
        return self._use_te

    @property
    def precision(self) -> MegatronPrecision:
        plugin = self.precision_plugin
        assert isinstance(plugin, MegatronPrecision), "setup_environment() sets the precision plugin"
        return plugin

    @property
    def checkpoint_io(self) -> MegatronCheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = MegatronCheckpointIO()
        if not isinstance(self._checkpoint_io, MegatronCheckpointIO):
            raise TypeError(
                f"MegatronStrategy saves sharded checkpoints with MegatronCheckpointIO, not "
                f"{type(self._checkpoint_io).__name__}; for async saving use "
                "MegatronCheckpointIO(async_save=True)"
            )
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: MegatronCheckpointIO | None) -> None:
        self._checkpoint_io = io

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Loading a sharded checkpoint needs the optimizer's sharded template, built in setup().
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return self._restore_optimizer

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """This rank's model chunks as the schedule sees them (wrapped after ``setup``)."""
        chunks = getattr(self.lightning_module, "chunks", None)
        if chunks is None:
            raise RuntimeError(
                "the LightningModule has no `chunks`; build the Megatron model(s) in "
                "configure_model() and store them as self.chunks (a ModuleList, one per virtual stage)"
            )
        return list(chunks)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Tensor/pipeline/context-parallel peers of one data-parallel rank read the same samples.
        return {"num_replicas": ps.get_data_parallel_world_size(), "rank": ps.get_data_parallel_rank()}

    def layout_key(self) -> tuple:
        return (self.world_size, self.parallel, self.precision.precision, self.use_te)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Layout, precision, recompute and fp8 fields for the model's ``TransformerConfig``."""
        p = self.parallel
        values: dict[str, Any] = dict(
            **p.megatron_sizes(),
            sequence_parallel=p.sp,
            **self.precision.transformer_config_kwargs(),
            **self.recompute.to_megatron(),
        )
        if self.fp8:
            values.update(fp8=self.fp8)
        if self.root_device.type == "cpu":
            # gloo has no real batched isend/irecv: under the interleaved schedule the batched
            # sends of activations and gradients can pair up with the wrong receives.
            values.update(batch_p2p_comm=False)
        return values

    def _configure_launcher(self) -> None:
        # One process needs no launcher; without one a single-device fit also runs in a notebook
        # (Lightning refuses the script-relaunching launcher in interactive sessions).
        if self.num_processes == 1 and self.num_nodes == 1:
            self._launcher = None
            return
        super()._configure_launcher()

    def kernel_config_kwargs(self) -> dict[str, Any]:
        """Fused-kernel ``TransformerConfig`` fields for this device and precision (the fast path)."""
        return kernel_config_kwargs(
            self.root_device, self.precision.params_dtype, self.fused_kernels, expert_parallel=self.parallel.ep
        )

    def use_cuda_graphs(self, transformer_config: Any) -> bool:
        """Whether model chunks built with ``transformer_config`` train as CUDA graphs."""
        wanted = self.fused_kernels if self.cuda_graphs is None else self.cuda_graphs
        if not wanted:
            return False
        supported = layer_graphs_supported(transformer_config, self.root_device, self.use_te)
        if self.cuda_graphs and not supported:
            raise ValueError(
                "MegatronStrategy(cuda_graphs=True) needs a CUDA device, no Transformer Engine layers, "
                f"tp = pp = cp = ep = 1 (have {self.parallel}), no recompute and no dropout; "
                "set cuda_graphs=None to use graphs only where they apply"
            )
        return supported

    # ------------------------------------------------------------------------ setup recipe
    def setup_environment(self) -> None:
        self._use_megatron_precision()
        if self.root_device.type == "cpu":
            self._cpu_mode = cpu_mode()
            self._cpu_mode.__enter__()
        if _distributed_is_initialized() and torch.distributed.get_backend() != self._get_process_group_backend():
            # A fit on GPU (NCCL) then one on CPU (gloo) in one process, or the other way round:
            # Lightning would reuse the old group, whose backend cannot move this device's tensors.
            torch.distributed.destroy_process_group()
        super().setup_environment()  # sets the device and creates the default process group
        self.parallel.validate(self.world_size)
        self._init_parallel_state()

    def _use_megatron_precision(self) -> None:
        plugin = self.precision_plugin
        if not isinstance(plugin, MegatronPrecision):
            self.precision_plugin = MegatronPrecision(getattr(plugin, "precision", "32-true"))

    def _init_parallel_state(self) -> None:
        global _megatron_groups
        sizes = self.parallel.megatron_sizes()
        layout = tuple(sizes.values())
        world = torch.distributed.group.WORLD
        kept = _megatron_groups
        if (
            kept is None
            or kept.layout != layout
            or kept.world is not world
            or ps.get_tensor_model_parallel_group(check_initialized=False) is not kept.tp_group
        ):
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(**sizes)
            _megatron_groups = _MegatronGroups(layout, world, ps.get_tensor_model_parallel_group())
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 1234))
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def setup(self, trainer: L.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: MegatronStrategy "
                "accumulates over microbatches itself; set accumulate_grad_batches=1 and make the "
                "DataLoader batch size micro_batch_size * (number of microbatches)"
            )
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}: Megatron clips by "
                "global norm only; use gradient_clip_algorithm='norm'"
            )
        module = self.lightning_module
        self._bare_chunks = self.chunks
        # Callbacks that change the model (Freeze, LoRA) act before Megatron's DDP and optimizer
        # see which parameters are trainable, and also outside fit (LoRA adds modules).
        for callback in trainer.callbacks:
            hook = getattr(callback, "configure_megatron_model", None)
            if callable(hook):
                hook(trainer, module, self._bare_chunks)
        if trainer.state.fn == TrainerFn.FITTING:
            limit_wgrad_fusion(self._bare_chunks)  # after freezing: frozen weights have no main_grad
        self.model_to_device()
        chunks = self._wrap_precision(self.chunks)
        if trainer.state.fn == TrainerFn.FITTING:
            chunks = self._wrap_ddp(chunks)
            module.chunks = torch.nn.ModuleList(chunks)
            self.setup_optimizers(trainer)
            self._connect_schedule_hooks(chunks)
        else:
            module.chunks = torch.nn.ModuleList(chunks)
        self.setup_precision_plugin()

    def _wrap_precision(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        if self.precision.params_dtype == torch.float32:
            return chunks
        # Casts parameters to 16 bits; casts the last stage's output back to fp32.
        return [Float16Module(chunk.config, chunk) for chunk in chunks]

    def _ddp_config(self) -> DistributedDataParallelConfig:
        values = dict(
            grad_reduce_in_fp32=self.precision.grad_reduce_in_fp32,
            overlap_grad_reduce=self.overlap_grad_reduce,
            overlap_param_gather=self.overlap_param_gather,
            use_distributed_optimizer=self.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        values.update(self.ddp_config_overrides)
        return DistributedDataParallelConfig(**values)

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        ddp_config = self._ddp_config()
        return [
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets start reducing early (as in Megatron-LM).
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(chunks)
        ]

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        """Build Megatron's optimizer from what ``configure_optimizers`` returned."""
        module = self.lightning_module
        returned = module.configure_optimizers()
        megatron_config, lr_scheduler = _split_megatron_config(returned)
        if megatron_config is None:
            optimizers, schedulers, monitor = _configure_optimizers(returned)
            if len(optimizers) != 1:
                raise ValueError(
                    f"configure_optimizers returned {len(optimizers)} optimizers; MegatronStrategy "
                    "drives exactly one (Megatron's optimizer over all model chunks)"
                )
            user_optimizer = optimizers[0]
            megatron_config = optimizer_config_from(user_optimizer)
            param_groups = user_optimizer.param_groups
        else:
            user_optimizer, schedulers, monitor = None, [lr_scheduler] if lr_scheduler else [], None
            param_groups = [dict(lr=megatron_config.lr, weight_decay=megatron_config.weight_decay, params=[])]
        if megatron_config.optimizer != "adam" and self.use_distributed_optimizer:
            raise ValueError(
                f"Megatron's distributed optimizer supports Adam only, not {megatron_config.optimizer!r}; "
                "use MegatronStrategy(use_distributed_optimizer=False) or an AdamW optimizer"
            )
        clip = trainer.gradient_clip_val
        overrides = dict(
            use_distributed_optimizer=self.use_distributed_optimizer,
            clip_grad=float(clip) if clip else (megatron_config.clip_grad if user_optimizer is None else 0.0),
            **self.precision.optimizer_kwargs(),
        )
        megatron_optimizer = build_megatron_optimizer(megatron_config, self.chunks, **overrides)
        optimizer = MegatronOptimizer(megatron_optimizer, param_groups, fused_adam=self.fused_kernels)
        if callable(lr_scheduler) and user_optimizer is None:
            schedulers = [lr_scheduler(optimizer)]
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        for config in configs:
            # Schedulers were built on the user's torch optimizer; they now drive the same
            # param_groups through the Megatron-backed one.
            config.scheduler.optimizer = optimizer
        _validate_scheduler_api(configs, module)
        self.optimizers = [optimizer]
        self.lr_scheduler_configs = configs

    def _connect_schedule_hooks(self, chunks: list[torch.nn.Module]) -> None:
        config = chunks[0].config
        optimizer = self.optimizers[0].megatron
        config.finalize_model_grads_func = schedule.finalize_grads
        config.grad_scale_func = optimizer.scale_loss
        if self.overlap_grad_reduce:
            no_sync = [chunk.no_sync for chunk in chunks]
            config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        if self.overlap_param_gather:
            param_sync = [chunk.start_param_sync for chunk in chunks]
            config.param_sync_func = param_sync[0] if len(chunks) == 1 else param_sync

    # ------------------------------------------------------------------------------ stepping
    def process_dataloader(self, dataloader: Any) -> Any:
        trainer = self.lightning_module.trainer
        if trainer.training and hasattr(dataloader, "__len__") and not isinstance(dataloader, ResumableLoader):
            return ResumableLoader(dataloader, batches_done=lambda: self._epoch_batches_done)
        return dataloader

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self.checkpoint_io.finalize(blocking=False)  # publish async saves that have finished

    def forward_backward(self, batch: dict[str, Any], forward_only: bool = False) -> dict[str, Tensor]:
        """Run all microbatches of ``batch`` through Megatron's schedule; return reduced metrics."""
        self.parallel.validate_sequence(batch["input_ids"].shape[1])
        chunks = self.chunks
        if not forward_only:
            for chunk in chunks:
                chunk.zero_grad_buffer()
            self.optimizers[0].megatron.zero_grad()
        metrics = schedule.forward_backward(
            self.lightning_module.forward_step,
            chunks,
            batch,
            self.parallel.micro_batch_size,
            forward_only=forward_only,
        )
        if not forward_only:
            self._epoch_batches_done = self._batch_idx + 1
            self.consumed_samples += batch["input_ids"].shape[0] * ps.get_data_parallel_world_size()
        return metrics

    def forward_logits(self, batch: dict[str, Any]) -> Tensor:
        """Full-vocabulary logits ``[b, s, vocab]`` on every rank (pipeline stages included)."""
        thd = getattr(self.lightning_module, "thd_packing", False)
        return schedule.forward_logits(self.chunks, batch, self.parallel.micro_batch_size, thd=thd)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # Megatron's schedule already ran backward for every microbatch inside training_step;
        # only the callback hooks are left to run.
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        return self.precision_plugin.post_backward(closure_loss, module)

    # --------------------------------------------------------------------------- checkpoints
    def _checkpoint_chunks(self, chunks: list[torch.nn.Module] | None = None) -> dict[str, torch.nn.Module]:
        """The unwrapped chunks (default: the model's) by checkpoint name (``model``, or
        ``model0``, ``model1``... with vpp): checkpoint keys must not depend on the 16-bit/DDP
        wrappers, which share the parameters of the chunks they wrap."""
        if chunks is None:
            chunks = self._bare_chunks or self.chunks
        if len(chunks) == 1:
            return {"model": chunks[0]}
        return {f"model{i}": chunk for i, chunk in enumerate(chunks)}

    def _model_sharded_state_dict(
        self, keep: Callable[[str], bool] | None = None, chunks: list[torch.nn.Module] | None = None
    ) -> dict[str, Any]:
        states = {name: chunk.sharded_state_dict() for name, chunk in self._checkpoint_chunks(chunks).items()}
        return _kept(states, keep)

    def load_weights(
        self,
        path: str | Path,
        keep: Callable[[str], bool] | None = None,
        chunks: list[torch.nn.Module] | None = None,
    ) -> None:
        """Copy a checkpoint's weights into ``chunks`` (default: the model's) in place, only the
        tensors ``keep`` accepts when given (weights only: no optimizer, loop or RNG state)."""
        template = {"state_dict": self._model_sharded_state_dict(keep, chunks)}
        loaded = self.checkpoint_io.load_checkpoint(path, sharded_state_dict=template)["state_dict"]
        for name, chunk in self._checkpoint_chunks(chunks).items():
            chunk.load_state_dict(loaded[name], strict=keep is None)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's shards of the model (Megatron ``ShardedTensor``s), keyed by chunk; only
        what ``model_state_filter`` keeps when a callback set one (adapter-only checkpoints)."""
        return self._model_sharded_state_dict(self.model_state_filter)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return self._optimizer_sharded_state_dict(optimizer, self.checkpoint_io.optim_format, is_loading=False)

    def _optimizer_sharded_state_dict(
        self,
        optimizer: MegatronOptimizer,
        optim_format: str,
        is_loading: bool,
        model_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if is_loading:
            prime_optimizer_state(optimizer.megatron)
        state = optimizer.megatron.sharded_state_dict(
            model_state or self._model_sharded_state_dict(),
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optim_format},
        )
        # The Lightning-facing groups hold the scheduler's current lr; Megatron's are synced from them.
        state["lightning_param_groups"] = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        return state

    def _rng_sharded_object(self) -> ShardedObject:
        return ShardedObject("rng_state", rng_state(), (self.world_size,), (self.global_rank,), replica_id=0)

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, **dataclasses.asdict(self.parallel)}

    def _expert_weights(self) -> str | None:
        """How MoE expert weights are stored: ``"stacked"`` (the fast path), ``"per_expert"``, or
        None without experts. Checkpointed weights are the same either way; the order of the
        parameters in the optimizer's flat buffers is not."""
        modules = [m for chunk in self.chunks for m in chunk.modules()]
        if any(isinstance(m, StackedExperts) for m in modules):
            return "stacked"
        return "per_expert" if any(isinstance(m, SequentialMLP) for m in modules) else None

    def _checkpoint_info(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        from importlib.metadata import version

        from lightning_megatron import __version__

        config = getattr(self.lightning_module, "config", None)
        return {
            "format": FORMAT,
            "versions": {
                "lightning_megatron": __version__,
                "megatron_core": version("megatron-core"),
                "torch": torch.__version__,
                "lightning": L.__version__,
            },
            "model_class": type(self.lightning_module).__qualname__,
            "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
            "hf_source": getattr(self.lightning_module.hparams, "hf_source", None),
            "layout": self._layout(),
            "precision": self.precision.precision,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "consumed_samples": self.consumed_samples,
            "optimizer_parts": self._optimizer_parts(),
            "optimizer_format": self.checkpoint_io.optim_format,
            "expert_weights": self._expert_weights(),
            "partial_model": self.model_state_filter is not None,
            **self.checkpoint_info_extras,
        }

    def _optimizer_parts(self) -> int:
        # Megatron chains one optimizer per parameter group family (e.g. dense and expert
        # parameters under expert parallelism); its checkpoint structure follows that chain.
        if not self.optimizers:
            return 0
        return len(getattr(self.optimizers[0].megatron, "chained_optimizers", [None]))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        """Every rank writes its shards (Lightning's default would let rank 0 write alone)."""
        checkpoint = dict(checkpoint, lightning_megatron=self._checkpoint_info(checkpoint))
        checkpoint["rng_state"] = self._rng_sharded_object()
        self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(self, filepath: str | Path) -> None:
        self.barrier("remove_checkpoint")  # nobody may still be writing or reading it
        if self.local_rank == 0:  # one rank per node, in case checkpoints live on node-local disks
            self.checkpoint_io.remove_checkpoint(filepath)
        self.barrier("remove_checkpoint")

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load into this rank's shards of the current layout (a different TP/PP/DP/EP is fine)."""
        io = self.checkpoint_io
        info = read_info(checkpoint_path)
        self._check_same_model(info, checkpoint_path)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        model_state = self._model_sharded_state_dict()
        keep = self._saved_model_keys(info, checkpoint_path)
        self._strict_model_load = keep is None
        template: dict[str, Any] = {"state_dict": _kept(model_state, keep)}
        load_optim = fitting and not (io.finetune or io.no_load_optim) and bool(self.optimizers)
        if load_optim:
            if "lora" in self.checkpoint_info_extras and "lora" not in info:
                raise CheckpointError(
                    f"{checkpoint_path} was saved without LoRA, so its optimizer state is not for these "
                    "adapters; load its weights as the base with MegatronCheckpointIO(finetune=True)"
                )
            if "optimizer_states" not in info["contents"]:
                raise CheckpointError(
                    f"{checkpoint_path} holds no optimizer state (saved with no_save_optim); resume "
                    "with MegatronCheckpointIO(no_load_optim=True), or finetune=True for weights only"
                )
            saved_parts, parts = info.get("optimizer_parts"), self._optimizer_parts()
            if saved_parts != parts:
                raise CheckpointError(
                    f"{checkpoint_path} holds the optimizer state as {saved_parts} part(s) (layout "
                    f"{info['layout']}); this layout's optimizer has {parts} (expert parallelism changes "
                    "that) and Megatron-Core cannot reshard between them. Resume with "
                    "MegatronCheckpointIO(no_load_optim=True) to load weights, scheduler and loop state"
                )
            optim_format = info.get("optimizer_format", "dp_reshardable")
            model_parallel = {
                k: v for k, v in info["layout"].items() if k not in ("world_size", "micro_batch_size", "sp")
            }
            here = {k: v for k, v in self._layout().items() if k in model_parallel}
            if optim_format == "dp_reshardable" and model_parallel != here:
                raise CheckpointError(
                    f"{checkpoint_path} saved its optimizer state as 'dp_reshardable' under {model_parallel}, "
                    f"which loads only under the same model-parallel layout, not {here}. Resume with "
                    "MegatronCheckpointIO(no_load_optim=True) (weights, scheduler and loops still load), "
                    "or save with MegatronCheckpointIO(optim_format='fully_reshardable')"
                )
            saved_experts, experts = info.get("expert_weights"), self._expert_weights()
            if optim_format == "dp_reshardable" and saved_experts is not None and saved_experts != experts:
                raise CheckpointError(
                    f"{checkpoint_path} saved its optimizer state as 'dp_reshardable' with {saved_experts} MoE "
                    f"experts, whose flat optimizer shards do not fit this model's {experts} experts (stacked "
                    "with MegatronStrategy(fused_kernels=True), per_expert without it or with LoRA). Resume with "
                    "the same expert layout, with MegatronCheckpointIO(no_load_optim=True) (weights, scheduler "
                    "and loops still load), or save with MegatronCheckpointIO(optim_format='fully_reshardable')"
                )
            template["optimizer_states"] = [
                self._optimizer_sharded_state_dict(
                    self.optimizers[0], optim_format, is_loading=True, model_state=model_state
                )
            ]
        same_layout = info["layout"] == self._layout()
        load_rng = fitting and not (io.finetune or io.no_load_rng) and "rng_state" in info["contents"]
        if load_rng and same_layout:
            template["rng_state"] = self._rng_sharded_object()
        elif load_rng:
            L.pytorch.utilities.rank_zero_info(
                f"RNG states not restored: the checkpoint's layout {info['layout']} differs from {self._layout()}"
            )
        loaded = io.load_checkpoint(checkpoint_path, sharded_state_dict=template)
        if "rng_state" in template:
            set_rng_state(loaded.pop("rng_state"))
        self._restore_optimizer = load_optim
        if io.finetune:
            # Weights only: step 0, fresh optimizer, schedulers and loops (Lightning still expects
            # a scheduler entry, so hand back the fresh schedulers' own state).
            return {
                "state_dict": loaded["state_dict"],
                "pytorch-lightning_version": loaded["pytorch-lightning_version"],
                "lr_schedulers": [c.scheduler.state_dict() for c in self.lr_scheduler_configs],
            }
        if fitting:
            self.consumed_samples = int(info.get("consumed_samples") or 0)
        return loaded

    def _saved_model_keys(self, info: dict[str, Any], path: str | Path) -> Callable[[str], bool] | None:
        """Which of this model's tensors the checkpoint holds, when not all: the adapters of an
        adapter-only checkpoint, or the base weights of one saved without LoRA."""
        saved_lora, lora = info.get("lora"), self.checkpoint_info_extras.get("lora")
        if info.get("partial_model"):
            if lora is None:
                raise CheckpointError(
                    f"{path} holds LoRA adapters only (r={saved_lora and saved_lora['r']}); add the LoRA "
                    "callback with the same options, on top of the base model (e.g. GPTModule.from_hf(base))"
                )
            _check_same_lora(saved_lora, lora, path)
            return self.model_state_filter
        if lora is not None and saved_lora is None:
            return lambda key: not is_adapter_key(key)  # base weights; the adapters start fresh
        if lora is not None:
            _check_same_lora(saved_lora, lora, path)
        return None

    def _check_same_model(self, info: dict[str, Any], path: str | Path) -> None:
        config = getattr(self.lightning_module, "config", None)
        saved = info.get("model_config")
        if saved is None or not hasattr(config, "to_dict"):
            return
        current = config.to_dict()
        differences = [
            f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} here"
            for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)
        ]
        if differences:
            raise CheckpointError(
                f"checkpoint {path} is for a different model; "
                + "; ".join(differences)
                + ". Build the module with the checkpoint's config (its lightning_megatron.json has it)"
            )

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        state = checkpoint["state_dict"]
        for name, chunk in self._checkpoint_chunks().items():
            chunk.load_state_dict(state[name], strict=strict and self._strict_model_load)
        if self.optimizers and not self._restore_optimizer:
            # 16-bit training keeps fp32 master weights in the optimizer: without a saved optimizer
            # state, start them from the loaded weights. (With one, they come from the checkpoint,
            # already loaded in place into the template, which must not be overwritten here.)
            self.optimizers[0].megatron.reload_model_params()

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        state = dict(checkpoint["optimizer_states"][0])
        groups = state.pop("lightning_param_groups")
        optimizer = self.optimizers[0]
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update(saved)
        optimizer.load_state_dict(state)

    # ------------------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and self._bare_chunks is not None:
            module.chunks = torch.nn.ModuleList(self._bare_chunks)
            self._bare_chunks = None
        if module is not None and getattr(module, "chunks", None) is not None:
            release_layer_graphs(module.chunks)  # they add into this fit's gradient buffers
        self._restore_optimizer = True
        self.optimizers = []
        self.lr_scheduler_configs = []
        if _distributed_is_initialized() and torch.distributed.get_backend() != "nccl":
            # gloo groups cost no GPU memory, so they are not kept (see _MegatronGroups): kept
            # ones would outlive the fit, and a child forked later (the notebook's TP=2 cell)
            # would free the parent's groups and crash.
            _forget_megatron_groups()
        super().teardown()
        if self._cpu_mode is not None:
            self._cpu_mode.__exit__(None, None, None)
            self._cpu_mode = None


@dataclasses.dataclass(frozen=True)
class _MegatronGroups:
    """The layout Megatron's process groups were last created for, in this process.

    On NCCL, a fit with the same layout on the same default group reuses them, and the teardown
    keeps them (the trained module can still run its parallel layers). Creating them anew for
    every fit leaked: Megatron never frees its groups, and each NCCL group holds a communicator
    with GPU memory of its own (6.6 GB per set on one H100), so a process that fits many times
    (the GPU tests) ran out of memory creating the next ones. gloo groups are created per fit.
    """

    layout: tuple
    world: Any  # the default process group they were split from
    tp_group: Any  # identifies them: unset or replaced by anyone else means create them again


_megatron_groups: _MegatronGroups | None = None


def _forget_megatron_groups() -> None:
    global _megatron_groups
    _megatron_groups = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _kept(states: dict[str, Any], keep: Callable[[str], bool] | None) -> dict[str, Any]:
    """The chunks' sharded state dicts with only the tensors ``keep`` accepts (all without it)."""
    if keep is None:
        return states
    return {name: {k: v for k, v in state.items() if keep(v.key)} for name, state in states.items()}


def _check_same_lora(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    fields = ("r", "alpha", "use_rslora", "targets", "target_regex", "modules_to_save")
    differences = [
        f"{f}={saved.get(f)!r} saved, {current.get(f)!r} here" for f in fields if saved.get(f) != current.get(f)
    ]
    if differences:
        raise CheckpointError(
            f"{path} holds LoRA adapters of another shape: " + "; ".join(differences) + ". Use the LoRA options "
            "the checkpoint was trained with (its lightning_megatron.json has them)"
        )


def _split_megatron_config(returned: Any) -> tuple[OptimizerConfig | None, Any]:
    """Pick a Megatron ``OptimizerConfig`` (and an optional scheduler factory) out of
    ``configure_optimizers``' return value; ``(None, None)`` for torch optimizers."""
    if isinstance(returned, OptimizerConfig):
        return returned, None
    if isinstance(returned, dict) and isinstance(returned.get("optimizer"), OptimizerConfig):
        scheduler = returned.get("lr_scheduler")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(
                "with a Megatron OptimizerConfig, 'lr_scheduler' must be a function "
                "optimizer -> scheduler (the optimizer does not exist yet)"
            )
        return returned["optimizer"], scheduler
    return None, None
