"""``lightning-megatron pt | sft | dpo``: LightningCLI over the library's own classes.

The configuration is the jsonargparse view of ``Trainer``, :class:`GPTModule` (with its
:class:`GPTConfig`), the data module of the command, :class:`MegatronStrategy`,
:class:`MegatronCheckpointIO` and Lightning's ``ModelCheckpoint``, plus a few run-level options
(``ckpt_path``, ``global_batch_size``, ``train_type``). YAML files (``--config``, repeatable)
and dotted overrides (``--model.lr 1e-5``) compose in order; ``--print_config`` prints a YAML
that ``--config`` reads back. Megatron-SWIFT names are translated first (:mod:`swift_args`).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_megatron.callbacks import DPO, LoRA
from lightning_megatron.checkpoint import INFO_FILE, MegatronCheckpointIO, read_info, versioned_dir
from lightning_megatron.models.config import PRESETS, GPTConfig
from lightning_megatron.models.gpt import GPTModule
from lightning_megatron.strategy import MegatronStrategy
from lightning_megatron.swift_args import UsageError

COMMANDS = {
    "pt": ("lightning_megatron.data.pretrain", "PretrainDataModule", "pretrain on text, JSONL or parquet files"),
    "sft": ("lightning_megatron.data.sft_datamodule", "SFTDataModule", "supervised fine-tuning on chat data"),
    "dpo": ("lightning_megatron.data.sft_datamodule", "PreferenceDataModule", "DPO on preference pairs"),
}


def _strategy_skip() -> set[str]:
    """MegatronStrategy arguments the CLI does not expose: the ``**kwargs`` of Lightning's and
    torch's DDP (jsonargparse follows them), the checkpoint IO (its own group) and the timeout."""
    own = set(inspect.signature(MegatronStrategy).parameters) - {"kwargs", "timeout"}
    probe = ArgumentParser()
    added = probe.add_class_arguments(MegatronStrategy, "s")
    return {name.split(".", 1)[1] for name in added} - own


class MegatronCLI(LightningCLI):
    """LightningCLI for one training command; ``run()`` fits. See :func:`main`."""

    def __init__(self, command: str, args: list[str]) -> None:
        module, name, description = COMMANDS[command]
        self.command = command
        super().__init__(
            GPTModule,
            getattr(importlib.import_module(module), name),
            run=False,
            args=args,
            seed_everything_default=42,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"lightning-megatron {command}", "description": description},
        )

    # ------------------------------------------------------------------------------- parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(MegatronStrategy, "strategy", skip=_strategy_skip())
        parser.add_class_arguments(MegatronCheckpointIO, "checkpoint_io")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="torch_dist checkpoint to resume or finetune from"
        )
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="samples per optimizer step over all data-parallel ranks (sets data.batch_size)",
        )
        parser.add_argument("--add_version", type=bool, default=True, help="save into checkpoint.dirpath/v<N>-<time>")
        parser.add_argument("--train_type", type=Literal["full", "lora"], default="full")
        parser.add_argument(
            "--preset",
            type=Literal[tuple(sorted(PRESETS))] | None,
            default=None,
            help="model.config defaults from GPTConfig.preset(PRESET) (a random model of that family)",
        )
        parser.add_class_arguments(LoRA, "lora")
        if self.command == "dpo":
            parser.add_lightning_class_args(DPO, "dpo")
        # Filled from --model / --ckpt_path when not given (see parse_arguments).
        tokenizer = parser._option_string_actions["--data.tokenizer"]
        tokenizer.required, tokenizer.default = False, None

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str]) -> None:
        """Parse twice: the model's config (and tokenizer) default to those of the Hugging Face
        model (``model.hf_source``), checkpoint (``ckpt_path``) or preset the first pass names,
        so explicit ``--model.config.*`` values still override them."""
        first = parser.parse_args([a for a in args if a.split("=")[0] != "--print_config"], _skip_validation=True)
        defaults = source_defaults(first.model.hf_source, first.ckpt_path, first.preset)
        if defaults:
            parser.set_defaults(defaults)
        self.config = parser.parse_args(args)

    # ---------------------------------------------------------------------- instantiation
    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.trainer.strategy not in ("auto", None):
            raise UsageError(
                f"trainer.strategy={config.trainer.strategy!r}: this CLI always trains with MegatronStrategy; "
                "set its options with --strategy.* (e.g. --strategy.tp 2)"
            )
        if config.data.tokenizer is None:
            raise UsageError(
                "no tokenizer: pass --model HF_DIR (its tokenizer is used) or --data.tokenizer TOKENIZER_DIR"
            )
        check_sources(self.command, config.data)
        if Path(config.data.tokenizer).exists():
            # Absolute in the saved config.yaml, which `lightning-megatron infer` reads from any directory.
            config.data.tokenizer = str(Path(config.data.tokenizer).resolve())
        if config.ckpt_path:
            config.ckpt_path = str(resolve_checkpoint(config.ckpt_path))

    def instantiate_classes(self) -> None:
        config = self.config
        try:
            self.config_init = self.parser.instantiate_classes(config)
        except ValueError as error:  # the classes' own checks of their arguments: bad input
            raise UsageError(str(error)) from error
        self.model = self.config_init.model
        self.datamodule = self.config_init.data
        self.datamodule.tokenizer = load_tokenizer(config.data.tokenizer)
        strategy = self.config_init.strategy
        strategy.checkpoint_io = self.config_init.checkpoint_io
        callbacks = list(self.config_init.trainer.callbacks or [])
        if config.train_type == "lora":
            callbacks.append(self.config_init.lora)
        trainer_kwargs: dict[str, Any] = dict(strategy=strategy, callbacks=callbacks)
        checkpoint = self.config_init.checkpoint
        if config.checkpoint.dirpath:
            if config.add_version:
                checkpoint.dirpath = str(versioned_dir(config.checkpoint.dirpath))
            # Logs and the saved config.yaml go beside the checkpoints, as Megatron-SWIFT's do.
            trainer_kwargs["default_root_dir"] = config.trainer.default_root_dir or checkpoint.dirpath
            callbacks.append(SaveAtEnd(checkpoint))
        self.trainer = self.instantiate_trainer(**trainer_kwargs)
        if config.global_batch_size:
            self.datamodule.batch_size = local_batch_size(
                config.global_batch_size, self.trainer.world_size, strategy.parallel
            )

    def run(self) -> None:
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.dirpath:
            print(f"checkpoints in {checkpoint.dirpath} (chat: lightning-megatron infer --load {checkpoint.dirpath})")


class SaveAtEnd(Callback):
    """Save when training ends, whatever ``save_interval`` (Megatron-SWIFT always does; Lightning's
    ``ModelCheckpoint`` saves on its own triggers only)."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.saved_step = -1

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            name = self.checkpoint.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step})
            trainer.save_checkpoint(name)


# ---------------------------------------------------------------------------------- helpers
def source_defaults(hf_source: str | None, ckpt_path: str | None, preset: str | None = None) -> dict[str, Any]:
    """Parser defaults taken from the model's origin: its ``GPTConfig`` fields and tokenizer."""
    if hf_source:
        config = GPTConfig.from_hf(hf_source).to_dict()
        tokenizer = hf_source
    elif ckpt_path:
        info = read_info(resolve_checkpoint(ckpt_path))
        config, tokenizer = info.get("model_config") or {}, info.get("hf_source")
    elif preset:
        config, tokenizer = GPTConfig.preset(preset).to_dict(), None
    else:
        return {}
    defaults = {f"model.config.{key}": value for key, value in config.items()}
    if tokenizer:
        defaults["data.tokenizer"] = tokenizer
    return defaults


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint (highest step) found under ``path``
    (e.g. the ``--save`` directory of an earlier run)."""
    path = Path(path)
    if not path.is_dir() or (path / INFO_FILE).exists():
        return path
    found = [info.parent for info in path.glob(f"**/{INFO_FILE}")]
    if not found:
        raise UsageError(f"{path} holds no lightning_megatron checkpoint ({INFO_FILE} not found under it)")
    return max(found, key=lambda ckpt: (read_info(ckpt).get("global_step") or 0, ckpt.stat().st_mtime))


def check_sources(command: str, data: Any) -> None:
    """Fail before any model is built when a dataset file is missing."""
    from lightning_megatron.data.indexed import _is_number, indexed_prefix
    from lightning_megatron.data.sft_datamodule import SELF_COGNITION, parse_source

    for option, sources in (("--dataset", data.sources), ("--val_dataset", data.get("val_sources") or [])):
        if isinstance(sources, str):
            sources = [sources]
        for source in sources:
            if command == "pt" and (_is_number(str(source)) or indexed_prefix(source) is not None):
                continue  # a Megatron --data-path item: a blend weight, or a prefix with its .bin and .idx
            path, _ = parse_source(str(source)) if command != "pt" else (str(source), None)
            if path != SELF_COGNITION and not Path(path).exists():
                raise UsageError(f"{option} {source}: no such file {path!r} (working directory {Path.cwd()})")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(name).exists():
        raise UsageError(f"tokenizer {name!r}: no such directory; pass a local Hugging Face tokenizer directory")
    return AutoTokenizer.from_pretrained(name)


def local_batch_size(global_batch_size: int, world_size: int, parallel: Any) -> int:
    """The DataLoader (data-parallel-local) batch for a global batch, checked against the layout."""
    dp = parallel.dp(world_size)
    if dp < 1:
        raise UsageError(
            f"tp*pp*cp={parallel.tp * parallel.pp * parallel.cp} needs at least that many processes, not "
            f"{world_size}; raise --trainer.devices (or --trainer.num_nodes)"
        )
    unit = parallel.micro_batch_size * dp
    if global_batch_size % unit:
        raise UsageError(
            f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size * data-parallel size "
            f"= {parallel.micro_batch_size} * {dp} = {unit}; e.g. {unit * max(1, global_batch_size // unit)}"
        )
    return global_batch_size // dp


def main(command: str, args: list[str]) -> int:
    """Run ``command`` (pt, sft or dpo) with canonical ``args`` (after :func:`swift_args.translate`)."""
    MegatronCLI(command, args).run()
    return 0


__all__ = ["MegatronCLI", "UsageError", "main"]
