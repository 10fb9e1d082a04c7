"""Megatron-SWIFT argument names, translated into the CLI's own dotted names before parsing.

``lightning-megatron sft --tensor_model_parallel_size 2 --dataset a.jsonl#500 b.jsonl --save out``
becomes ``--strategy.tp 2 --data.sources ["a.jsonl#500", "b.jsonl"] --checkpoint.dirpath out``:
there is one configuration (the jsonargparse view of the library's classes) and the SWIFT names
are only spellings of it, so ``--print_config`` always shows the canonical names.
"""

from __future__ import annotations

import json

# SWIFT name -> canonical name, for pt, sft and dpo.
TRAIN_ALIASES: dict[str, str] = {
    # the parallel layout (MegatronStrategy)
    "tensor_model_parallel_size": "strategy.tp",
    "tp": "strategy.tp",
    "pipeline_model_parallel_size": "strategy.pp",
    "pp": "strategy.pp",
    "virtual_pipeline_model_parallel_size": "strategy.vpp",
    "context_parallel_size": "strategy.cp",
    "cp": "strategy.cp",
    "expert_model_parallel_size": "strategy.ep",
    "ep": "strategy.ep",
    "expert_tensor_parallel_size": "strategy.etp",
    "sequence_parallel": "strategy.sp",
    "micro_batch_size": "strategy.micro_batch_size",
    "use_distributed_optimizer": "strategy.use_distributed_optimizer",
    "overlap_grad_reduce": "strategy.overlap_grad_reduce",
    "overlap_param_gather": "strategy.overlap_param_gather",
    "recompute_granularity": "strategy.recompute.granularity",
    "recompute_method": "strategy.recompute.method",
    "recompute_num_layers": "strategy.recompute.num_layers",
    "recompute_modules": "strategy.recompute.modules",
    # how long to train, evaluate and log (Trainer)
    "train_iters": "trainer.max_steps",
    "max_epochs": "trainer.max_epochs",
    "eval_interval": "trainer.val_check_interval",
    "eval_iters": "trainer.limit_val_batches",
    "log_interval": "trainer.log_every_n_steps",
    "clip_grad": "trainer.gradient_clip_val",
    "seed": "seed_everything",
    # the model (GPTModule, GPTConfig)
    "model_type": "preset",
    # optimizer and schedule (GPTModule)
    "lr": "model.lr",
    "lr_warmup_iters": "model.warmup_steps",
    "lr_decay_style": "model.lr_decay",
    "weight_decay": "model.weight_decay",
    "adam_eps": "model.eps",
    # checkpoints (ModelCheckpoint, MegatronCheckpointIO, fit's ckpt_path)
    "save": "checkpoint.dirpath",
    "save_interval": "checkpoint.every_n_train_steps",
    "load": "ckpt_path",
    "finetune": "checkpoint_io.finetune",
    "async_save": "checkpoint_io.async_save",
    "no_save_optim": "checkpoint_io.no_save_optim",
    "no_save_rng": "checkpoint_io.no_save_rng",
    "no_load_optim": "checkpoint_io.no_load_optim",
    "no_load_rng": "checkpoint_io.no_load_rng",
    # data (SFTDataModule / PretrainDataModule / PreferenceDataModule)
    "dataset": "data.sources",
    "val_dataset": "data.val_sources",
    "split_dataset_ratio": "data.split_dataset_ratio",
    "packing": "data.packing",
    "streaming": "data.streaming",
    "template": "data.template",
    "model_name": "data.model_name",
    "model_author": "data.model_author",
    "tokenizer": "data.tokenizer",
    "max_length": "data.max_length",
    # adapters and preference training (callbacks, see train_cli)
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "beta": "dpo.beta",
}
PT_ALIASES = {**TRAIN_ALIASES, "max_length": "data.seq_length"}

INFER_ALIASES: dict[str, str] = {"tensor_model_parallel_size": "tp"}

ALIASES = {"pt": PT_ALIASES, "sft": TRAIN_ALIASES, "dpo": TRAIN_ALIASES, "infer": INFER_ALIASES}

# Options that take several values (``--dataset a.jsonl b.jsonl``); they become one JSON list.
LISTS = {"dataset", "val_dataset", "target_modules", "recompute_modules"}
# Switches SWIFT users also write bare (``--finetune``) or capitalized (``--finetune True``).
SWITCHES = {
    "sequence_parallel",
    "use_distributed_optimizer",
    "overlap_grad_reduce",
    "overlap_param_gather",
    "finetune",
    "async_save",
    "no_save_optim",
    "no_save_rng",
    "no_load_optim",
    "no_load_rng",
    "packing",
    "streaming",
    "stream",
}
CHOICES = {"train_type": ("full", "lora")}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class UsageError(ValueError):
    """Bad command-line input: ``lightning-megatron`` prints it without a traceback, exit status 2."""


def translate(command: str, argv: list[str]) -> list[str]:
    """Rewrite SWIFT-style options in ``argv`` to the canonical names of ``command``'s parser.

    Canonical options (``--model.lr``, ``--config``...) pass through unchanged, in order, so
    later options still override earlier ones and config files.
    """
    aliases = ALIASES[command]
    special = set(aliases) | SWITCHES | set(CHOICES) | ({"model"} if command != "infer" else set())
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name, has_value, inline = token[2:].partition("=")
        if not token.startswith("--") or name not in special:
            out.append(token)
            continue
        values = [inline] if has_value else []
        if name in LISTS and not has_value:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        elif not has_value and i < len(argv) and not (name in SWITCHES and argv[i].startswith("--")):
            values.append(argv[i])
            i += 1
        if name in SWITCHES:
            values = [(values[0] if values else "true").lower()]
        if not values:
            raise UsageError(f"--{name} needs a value")
        if name in CHOICES and values[0] not in CHOICES[name]:
            raise UsageError(f"--{name} {values[0]!r} is not supported; choose one of {', '.join(CHOICES[name])}")
        if name == "model":
            # `--model cfg.yaml` / `--model '{...}'` keep their LightningCLI meaning (the model group).
            is_config = values[0].endswith(CONFIG_SUFFIXES) or values[0].lstrip().startswith("{")
            out += ["--model", values[0]] if is_config else ["--model.hf_source", values[0]]
        else:
            value = json.dumps(values) if name in LISTS else values[0]
            out += [f"--{aliases.get(name, name)}", value]
    return out
