"""``lightning-megatron infer``: chat with a torch_dist checkpoint or a Hugging Face model.

Each line read from stdin is a user turn (``clear`` forgets the conversation, ``exit`` or end of
input stops); the reply is streamed to stdout token by token. Under tensor parallelism rank 0
reads and prints, and every rank decodes the same tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch

from lightning_megatron.checkpoint import read_info
from lightning_megatron.cli import _trainer
from lightning_megatron.models.config import GPTConfig
from lightning_megatron.models.gpt import GPTModule
from lightning_megatron.swift_args import UsageError
from lightning_megatron.train_cli import load_tokenizer, resolve_checkpoint


def infer(
    load: str | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
    tp: int = 1,
    precision: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    system: str | None = None,
    stream: bool = True,
    seed: int = 0,
) -> None:
    """Chat with a model.

    Args:
        load: a torch_dist checkpoint, or a directory holding some (the newest is used, e.g.
            the ``--save`` directory of a training run).
        model: a Hugging Face model directory (weights, unless ``load`` is given; tokenizer).
        tokenizer: a tokenizer directory; default: ``model``, the checkpoint's Hugging Face
            source, or the ``data.tokenizer`` of the training run's saved ``config.yaml``.
        tp: tensor-parallel size (one process per rank).
        precision: Lightning precision; default ``bf16-mixed`` on GPU, ``32-true`` on CPU.
        max_new_tokens: the longest reply, in tokens.
        temperature: 0 decodes greedily; above 0 samples.
        top_k: sample among the k likeliest tokens only.
        seed: sampling seed.
        system: a system prompt.
        stream: print tokens as they come (otherwise each reply at once).
    """
    if load is None and model is None:
        raise UsageError("give --load CHECKPOINT (a torch_dist checkpoint or --save directory) or --model HF_DIR")
    checkpoint, hf_source = None, None
    if load is not None:
        checkpoint = resolve_checkpoint(load)
        info = read_info(checkpoint)
        if not info.get("model_config"):
            raise UsageError(f"{checkpoint} was not saved from a GPTModule (no model_config); infer cannot build it")
        module = GPTModule(GPTConfig(**info["model_config"]))
        hf_source = info.get("hf_source")
    else:
        module = GPTModule.from_hf(model)
    name = tokenizer or model or hf_source or (checkpoint and saved_tokenizer(checkpoint))
    if not name:
        raise UsageError(f"no tokenizer known for {load}; pass --tokenizer TOKENIZER_DIR")
    chat = Chat(
        load_tokenizer(name),
        system,
        dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed),
        stream,
    )
    precision = precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = _trainer(devices=tp, callbacks=[chat], precision=precision, tp=tp)
    # The chat runs in on_predict_start, once the model is built and the checkpoint loaded;
    # the one-token batch only completes Lightning's predict loop.
    batch = torch.utils.data.DataLoader([{"input_ids": torch.zeros(1, dtype=torch.long)}], batch_size=1)
    trainer.predict(module, batch, ckpt_path=str(checkpoint) if checkpoint else None, return_predictions=False)


def saved_tokenizer(checkpoint: Path) -> str | None:
    """``data.tokenizer`` of the ``config.yaml`` that ``lightning-megatron sft|pt|dpo`` saved
    beside the checkpoint (or in its logger's directory)."""
    import yaml

    for config in [checkpoint.parent / "config.yaml", *sorted(checkpoint.parent.glob("*/*/config.yaml"))]:
        if config.exists():
            return (yaml.safe_load(config.read_text()).get("data") or {}).get("tokenizer")
    return None


class Chat(L.Callback):
    """Runs the chat loop inside ``trainer.predict`` (the strategy has built and loaded the model)."""

    def __init__(
        self,
        tokenizer: Any,
        system: str | None,
        decoding: dict[str, Any],
        stream: bool = True,
        input: TextIO | None = None,
        output: TextIO | None = None,
    ) -> None:
        self.tokenizer, self.system, self.decoding, self.stream = tokenizer, system, decoding, stream
        self.input, self.output = input or sys.stdin, output or sys.stdout
        # A chat turn ends at the end-of-sequence token or any other special token (<|im_end|>...).
        self.stop_ids = {i for i in [tokenizer.eos_token_id, *tokenizer.all_special_ids] if i is not None}

    def on_predict_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        rank0 = trainer.global_rank == 0
        device = trainer.strategy.root_device
        messages = self._fresh()

        def next_token(ids: list[int]) -> int:
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            step = len(ids)  # a different sampling seed for every position
            out = pl_module.generate(
                tokens, 1, self.decoding["temperature"], self.decoding["top_k"], seed=self.decoding["seed"] + step
            )
            return int(out[0, -1])

        while (line := self._read_line(rank0)) is not None:
            query = line.strip()
            if query in ("exit", "quit"):
                break
            if query == "clear":
                messages = self._fresh()
                continue
            if not query:
                continue
            messages.append({"role": "user", "content": query})
            prompt = self._prompt_ids(messages)
            room = pl_module.config.max_position_embeddings - len(prompt)
            if room < 1:
                if rank0:
                    self.output.write(f"[the conversation has {len(prompt)} tokens, the model's limit; cleared]\n")
                messages = self._fresh()
                continue
            reply = ""
            for piece in stream_reply(
                next_token, self.tokenizer, prompt, min(room, self.decoding["max_new_tokens"]), self.stop_ids
            ):
                reply += piece
                if rank0 and self.stream:
                    self.output.write(piece)
                    self.output.flush()
            if rank0:
                self.output.write(("" if self.stream else reply) + "\n")
                self.output.flush()
            messages.append({"role": "assistant", "content": reply})

    def _fresh(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer("\n".join(m["content"] for m in messages))["input_ids"]

    def _read_line(self, rank0: bool) -> str | None:
        """Rank 0 reads a line (``None`` at end of input); every rank gets it."""
        line = None
        if rank0:
            self.output.write("<<< ")
            self.output.flush()
            line = self.input.readline() or None
            if line is not None and not self.input.isatty():
                self.output.write(line if line.endswith("\n") else line + "\n")  # echo piped input
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            box = [line]
            torch.distributed.broadcast_object_list(box, src=0)
            line = box[0]
        return line


def stream_reply(
    next_token: Callable[[list[int]], int],
    tokenizer: Any,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
) -> Iterator[str]:
    """Decode token by token, yielding the text each token adds."""
    new: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        token = next_token(prompt + new)
        if token in stop_ids:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split over tokens: wait for the rest
            continue
        yield text[len(shown) :]
        shown = text


def main(args: list[str]) -> int:
    """``lightning-megatron infer`` with canonical ``args`` (after :func:`swift_args.translate`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lightning-megatron infer", description="chat with a torch_dist checkpoint or a Hugging Face model"
    )
    parser.add_argument("--config", action="config", help="a YAML file with these options")
    parser.add_function_arguments(infer)
    config = parser.parse_args(args)
    infer(**{key: value for key, value in config.as_dict().items() if key != "config"})
    return 0
