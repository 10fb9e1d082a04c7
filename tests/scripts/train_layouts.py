"""Train the same tiny model under several parallel layouts, one after another, in one job.

Each layout is a separate ``trainer.fit`` in the same processes (so this also exercises
tearing down and re-creating Megatron's parallel state). Rank 0 writes, per layout, the loss and
grad norm of every step to ``--out`` as JSON.

    python tests/scripts/train_layouts.py --devices 2 --model dense --layouts tp2 pp2 --out r.json
"""

from __future__ import annotations

import argparse
import json
import re
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronCheckpointIO, MegatronStrategy
from lightning_megatron.data.text import ByteTokenizer, TokenBlocks, bundled_corpus

GLOBAL_BATCH = 8
STEPS = 4
MODELS = {
    "dense": dict(
        family="qwen2",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        tie_word_embeddings=False,
    ),
    "tied": dict(
        family="qwen3",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        kv_channels=16,
        num_query_groups=2,
        ffn_hidden_size=128,
        tie_word_embeddings=True,
    ),
    "moe": dict(
        family="qwen2_moe",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        moe_ffn_hidden_size=32,
        num_experts=4,
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=64,
        moe_aux_loss_coeff=0.0,
    ),
}


def parse_layout(name: str, devices: int) -> dict:
    """'tp2_pp2_vpp2_ep2_sp_mbs2' -> strategy kwargs; the rest of the world is data parallel.
    'overlap' turns on Megatron DDP's overlapped grad reduce-scatter and param all-gather;
    'eager' turns off the CUDA graphs of the layers (on by default where they apply);
    'noloadoptim' resumes without the optimizer state; 'fullyreshardable' saves the optimizer
    state in Megatron's fully reshardable format."""
    kwargs: dict = {"micro_batch_size": 1}
    for part in name.split("_"):
        if part == "sp":
            kwargs["sp"] = True
        elif part == "overlap":
            kwargs.update(overlap_grad_reduce=True, overlap_param_gather=True)
        elif part == "eager":
            kwargs["cuda_graphs"] = False
        elif part == "noloadoptim":
            kwargs["checkpoint_io"] = MegatronCheckpointIO(no_load_optim=True)
        elif part == "fullyreshardable":
            kwargs["checkpoint_io"] = MegatronCheckpointIO(optim_format="fully_reshardable")
        elif part.startswith("mbs"):
            kwargs["micro_batch_size"] = int(part[3:])
        else:
            key, value = re.fullmatch(r"([a-z]+)(\d+)", part).groups()
            kwargs[key] = int(value)
    return kwargs


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.graphed_layers = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.grad_norms.append(trainer.strategy.optimizers[0].last_grad_norm)
        graphs = [getattr(m, "cuda_graphs", None) for m in module.modules()]
        self.graphed_layers = sum(getattr(g, "key", None) is not None for g in graphs)

    def on_train_end(self, trainer, module) -> None:
        # callback_metrics travel back to the calling process when the ranks were forked/spawned.
        trainer.callback_metrics["record/loss"] = torch.tensor(self.losses, dtype=torch.float64)
        trainer.callback_metrics["record/grad_norm"] = torch.tensor(self.grad_norms, dtype=torch.float64)
        trainer.callback_metrics["record/graphed_layers"] = torch.tensor(self.graphed_layers)


def train(
    model_name: str,
    layout: str,
    devices: int,
    precision: str,
    accelerator: str = "cpu",
    start_method: str = "popen",
    predict: bool = False,
    save_dir: str | None = None,
) -> dict:
    """Train STEPS steps under ``layout``. With ``save_dir``, checkpoint every 2 steps into
    ``save_dir/<layout>``; a layout ``"tp2@pp2"`` instead resumes tp2 from pp2's step-2 checkpoint."""
    layout, _, resume_from = layout.partition("@")
    ckpt_path = f"{save_dir}/{resume_from}/epoch=0-step=2.ckpt" if resume_from else None
    strategy_kwargs = parse_layout(layout, devices)
    strategy_kwargs["start_method"] = start_method
    tokenizer = ByteTokenizer()
    data = TokenBlocks.from_text(bundled_corpus()[:30000], tokenizer, 32)
    values = dict(MODELS[model_name])
    config = GPTConfig.preset(values.pop("family"), vocab_size=tokenizer.vocab_size, **values)
    strategy = MegatronStrategy(**strategy_kwargs)
    model_parallel = strategy.parallel.tp * strategy.parallel.pp * strategy.parallel.cp
    dp = devices // model_parallel
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // dp, shuffle=False, drop_last=True)
    record = Record()
    callbacks: list = [record]
    if save_dir and not resume_from:
        callbacks.append(ModelCheckpoint(dirpath=f"{save_dir}/{layout}", every_n_train_steps=2, save_top_k=-1))
        # Also keep only the best of a checkpoint per step: older ones are deleted on every node.
        callbacks.append(
            ModelCheckpoint(
                dirpath=f"{save_dir}/{layout}-best", every_n_train_steps=1, save_top_k=1, monitor="train/loss"
            )
        )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=len(callbacks) > 1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
    )
    module = GPTModule(config, lr=5e-3, warmup_steps=0, lr_decay="constant")
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    result = {
        "loss": trainer.callback_metrics["record/loss"].tolist(),
        "grad_norm": trainer.callback_metrics["record/grad_norm"].tolist(),
        "graphed_layers": int(trainer.callback_metrics["record/graphed_layers"]),
    }
    if predict:
        # Logits of the trained model on one batch (the prediction path gathers TP shards and
        # broadcasts from the last pipeline stage); a slice is enough to compare layouts.
        trainer = L.Trainer(
            strategy=MegatronStrategy(**strategy_kwargs),
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_predict_batches=1,
        )
        logits = trainer.predict(module, loader)[0]
        result["logits"] = logits[0, -4:, :32].flatten().tolist()  # sample 0 is on DP rank 0 in every layout
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--layouts", nargs="+", required=True)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--start-method", default="popen")
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--save-dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = {
        layout: train(
            args.model,
            layout,
            args.devices,
            args.precision,
            args.accelerator,
            args.start_method,
            args.predict,
            args.save_dir,
        )
        for layout in args.layouts
    }
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
