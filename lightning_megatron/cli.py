"""``lightning-megatron``: train, chat with and convert Megatron models from the command line.

    lightning-megatron pt|sft|dpo --config run.yaml --model HF_DIR --dataset data.jsonl --tp 2 --save out
    lightning-megatron infer --load out [--tp 2]
    lightning-megatron export --to-mcore --model HF_DIR --output CKPT_DIR [--tp 2 --pp 2]
    lightning-megatron export --to-hf --load CKPT_DIR --output HF_DIR [--test-convert-precision]
    lightning-megatron export --to-hf --adapters LORA_CKPT [--load BASE] --output DIR [--merge-lora]
    lightning-megatron check --model HF_DIR --load CKPT_DIR
    lightning-megatron preprocess --input data.jsonl --output-prefix out/data --tokenizer TOKENIZER_DIR
    lightning-megatron plan --model qwen2 --gpus 8 --gpu-memory 80 --seq-length 4096 --global-batch-size 64

The flags follow Megatron-SWIFT's ``swift export``. ``--test-convert-precision`` (and ``check``)
run the Hugging Face model and the Megatron checkpoint on the same prompt and fail when their
logits differ by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_megatron import plan

PROMPT = "The quick brown fox jumps over the lazy dog. Megatron meets Lightning."


def _trainer(devices: int = 1, callbacks: list | None = None, precision: str = "32-true", **strategy: Any):
    import lightning as L

    from lightning_megatron import MegatronStrategy

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return L.Trainer(
        strategy=MegatronStrategy(**strategy),
        accelerator=accelerator,
        devices=devices,
        logger=False,
        precision=precision,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )


def _batches(ids: torch.Tensor):
    return torch.utils.data.DataLoader([{"input_ids": ids[0], "labels": ids[0]}], batch_size=1)


def to_mcore(model: str, output: str, tp: int = 1, pp: int = 1, ep: int = 1) -> Path:
    """Import a HF model under a layout and save it as a weights-only torch_dist checkpoint
    (load it for training with ``MegatronCheckpointIO(finetune=True)``)."""
    import lightning as L

    from lightning_megatron import GPTModule

    class SaveOnce(L.Callback):
        def on_validation_start(self, trainer, module):
            trainer.save_checkpoint(output, weights_only=True)

    module = GPTModule.from_hf(model)
    # Keep the HF model's dtype: a bf16 model is saved as bf16 weights.
    hf = json.loads((Path(model) / "config.json").read_text())
    precision = "bf16-true" if hf.get("dtype", hf.get("torch_dtype")) == "bfloat16" else "32-true"
    # tp * pp * ep ranks always form a valid layout (data parallel ep; experts split over it).
    trainer = _trainer(devices=tp * pp * ep, callbacks=[SaveOnce()], precision=precision, tp=tp, pp=pp, ep=ep)
    prompt = torch.zeros(1, 8, dtype=torch.long)
    trainer.validate(module, _batches(prompt), verbose=False)  # one tiny batch: the save happens first
    return Path(output)


def prompt_ids(hf_dir: Path, vocab_size: int) -> torch.Tensor:
    """The prompt through the model's tokenizer, or fixed random ids when it has none."""
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT, return_tensors="pt")["input_ids"]
        if ids.numel() and int(ids.max()) < vocab_size:
            return ids
    except Exception:  # noqa: BLE001 - no tokenizer files: fall back to ids
        pass
    return torch.randint(0, vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))


def compare(hf_dir: str | Path, checkpoint: str | Path) -> dict[str, float]:
    """Logits of the HF model vs the Megatron checkpoint (fp32) on the same prompt."""
    import transformers

    from lightning_megatron import GPTConfig, GPTModule
    from lightning_megatron.checkpoint import read_info

    config = GPTConfig(**read_info(checkpoint)["model_config"])
    ids = prompt_ids(Path(hf_dir), config.vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(ids).logits.float()
    ours = _trainer().predict(GPTModule(config), _batches(ids), ckpt_path=str(checkpoint))[0]
    ours = ours[..., : config.vocab_size].float().cpu()
    diff = (ours - reference).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def check(hf_dir: str | Path, checkpoint: str | Path, tolerance: float) -> bool:
    result = compare(hf_dir, checkpoint)
    ok = result["max_abs_diff"] <= tolerance
    print(
        f"precision check: max |diff| {result['max_abs_diff']:.3g}, mean |diff| {result['mean_abs_diff']:.3g}, "
        f"top-1 agreement {result['top1_agreement']:.3f} (tolerance {tolerance:g}): {'OK' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


# Commands with their own (jsonargparse) parsers; see train_cli.py and chat.py.
CONFIG_COMMANDS = {
    "pt": "pretrain (LightningCLI: --config YAML, --print_config, Megatron-SWIFT names)",
    "sft": "supervised fine-tuning (same options as pt, chat data)",
    "dpo": "preference training (same options as sft, preference pairs)",
    "infer": "chat with a torch_dist checkpoint or Hugging Face model, streaming tokens",
}


def run_config_command(command: str, argv: list[str]) -> int:
    from lightning_megatron.checkpoint import CheckpointError
    from lightning_megatron.swift_args import UsageError, translate

    try:
        args = translate(command, argv)
        if command == "infer":
            from lightning_megatron.chat import main as chat_main

            return chat_main(args)
        from lightning_megatron.train_cli import main as train_main

        return train_main(command, args)
    except (UsageError, CheckpointError) as error:  # bad input: the message says what to do
        print(f"lightning-megatron {command}: error: {error}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CONFIG_COMMANDS:
        return run_config_command(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="lightning-megatron", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in CONFIG_COMMANDS.items():
        commands.add_parser(name, help=help, add_help=False)
    export = commands.add_parser("export", help="convert between Hugging Face and torch_dist")
    direction = export.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-mcore", action="store_true", help="HF directory -> torch_dist checkpoint")
    direction.add_argument("--to-hf", action="store_true", help="torch_dist checkpoint -> HF directory")
    export.add_argument("--model", help="Hugging Face model directory (source for --to-mcore)")
    export.add_argument("--load", help="torch_dist checkpoint directory (source for --to-hf)")
    export.add_argument(
        "--adapters",
        help="a LoRA checkpoint: written as a PEFT adapter directory, or with --merge-lora folded into the base "
        "(--load, or a Hugging Face directory; default: the HF model the adapters were trained on)",
    )
    export.add_argument("--merge-lora", action="store_true", help="with --adapters: write the merged model")
    export.add_argument("--output", required=True)
    export.add_argument("--tp", type=int, default=1)
    export.add_argument("--pp", type=int, default=1)
    export.add_argument("--ep", type=int, default=1)
    export.add_argument("--test-convert-precision", action="store_true")
    export.add_argument("--tolerance", type=float, default=1e-3, help="max |logit diff| (default 1e-3)")
    prep = commands.add_parser("preprocess", help="tokenize text/JSONL/parquet into Megatron .bin/.idx files")
    prep.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl or .parquet files")
    prep.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    prep.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (default 1)")
    verify = commands.add_parser("check", help="compare a HF model and a torch_dist checkpoint's logits")
    verify.add_argument("--model", required=True)
    verify.add_argument("--load", required=True)
    verify.add_argument("--tolerance", type=float, default=1e-3)
    planner = commands.add_parser("plan", help="parallel layouts that fit a model on N GPUs, with memory estimates")
    plan.add_arguments(planner)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")

    if args.command == "plan":
        return plan.run(args)

    if args.command == "check":
        return 0 if check(args.model, args.load, args.tolerance) else 1
    if args.command == "preprocess":
        from transformers import AutoTokenizer

        from lightning_megatron.data.indexed import preprocess
        from lightning_megatron.data.pretrain import read_documents

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        documents = (doc for path in args.input for doc in read_documents(path, args.text_field))
        prefix = preprocess(documents, args.output_prefix, tokenizer, num_proc=args.num_proc)
        print(f"wrote {prefix}.bin and {prefix}.idx", flush=True)
        return 0
    if args.to_mcore:
        if not args.model:
            parser.error("--to-mcore needs --model HF_DIR")
        to_mcore(args.model, args.output, args.tp, args.pp, args.ep)
        hf_dir, checkpoint = args.model, args.output
    elif args.adapters:
        from lightning_megatron.hf import export_peft, merge_lora_to_hf

        if args.merge_lora:
            merge_lora_to_hf(args.adapters, args.output, base=args.load)
            print(f"wrote the merged model to {args.output}", flush=True)
        else:
            export_peft(args.adapters, args.output)
            print(f"wrote PEFT adapters to {args.output}", flush=True)
        return 0
    else:
        if not args.load:
            parser.error("--to-hf needs --load CKPT_DIR")
        if args.merge_lora:
            parser.error("--merge-lora needs --adapters LORA_CKPT")
        from lightning_megatron import export_hf

        export_hf(args.load, args.output)
        hf_dir, checkpoint = args.output, args.load
    if not args.test_convert_precision:
        return 0
    if args.to_mcore and args.tp * args.pp * args.ep > 1:
        if _is_rank_zero():
            print(
                f"saved under {args.tp * args.pp * args.ep} ranks; check it in a new process with: "
                f"lightning-megatron check --model {hf_dir} --load {checkpoint}",
                flush=True,
            )
        return 0
    return 0 if check(hf_dir, checkpoint, args.tolerance) else 1


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
