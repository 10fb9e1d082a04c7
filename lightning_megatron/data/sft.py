"""Supervised fine-tuning rows -> token ids with an assistant-only loss, and packing.

Rows come in the shapes people have (Megatron-SWIFT reads the same):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`` (OpenAI chat)
- ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`` (ShareGPT)
- ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca)
- ``{"query": ..., "response": ..., "history": [[q, r], ...]}``

each optionally with ``"system"``. They are rendered with the tokenizer's own chat template
(``apply_chat_template``), or a built-in one (``chatml``, ``llama3``) when it has none.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

LossOn = Literal["assistant", "all", "last"]
Truncation = Literal["error", "drop", "truncate_left", "truncate_right"]

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


class DataFormatError(ValueError):
    """A row that cannot be used, with where it came from."""


class RowTooLongError(DataFormatError):
    """A row over ``max_length`` under ``truncation="error"`` (never skipped by ``lenient``)."""


def to_messages(row: dict[str, Any], where: str = "row") -> list[dict[str, str]]:
    """Normalize any supported row shape to chat ``messages``."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got a {type(row).__name__}")
    system = row.get("system")
    if "messages" in row:
        try:
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        except (KeyError, TypeError):
            raise DataFormatError(f"{where}: each of 'messages' needs a 'role' and a 'content'") from None
    elif "conversations" in row:
        try:
            messages = [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
        except KeyError as error:
            raise DataFormatError(f"{where}: unknown ShareGPT speaker {error}; use human/gpt/system") from None
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    elif "query" in row and "response" in row:
        messages = []
        for query, response in row.get("history") or []:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages += [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise DataFormatError(
            f"{where}: row has keys {sorted(row)}, matching no format; expected 'messages', "
            "'conversations', 'instruction'+'output' or 'query'+'response'"
        )
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise DataFormatError(f"{where}: no assistant turn to learn from")
    if any(not (m["content"] or "").strip() for m in assistant):
        raise DataFormatError(f"{where}: an assistant turn is empty")
    return messages


def use_template(tokenizer: Any, template: str | None) -> None:
    """Give the tokenizer a chat template: a built-in name, a Jinja string, or its own."""
    if template is not None:
        tokenizer.chat_template = BUILTIN_TEMPLATES.get(template, template)
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass template='chatml' or 'llama3' (built in) or a Jinja string"
        )


def render(
    messages: list[dict[str, str]], tokenizer: Any, loss_on: LossOn = "assistant"
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` where no loss) for one conversation.

    Templates with ``{% generation %}`` markers give transformers' assistant mask. For others,
    each assistant turn's tokens are found by rendering the conversation up to that turn with the
    generation prompt and then with the turn: the difference is what the model must produce
    (including whatever the template puts after the turn's end token).
    """
    if loss_on == "all":
        ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        return ids, list(ids)
    if "{% generation %}" in (tokenizer.chat_template or ""):
        # The template marks assistant text itself: use transformers' own mask.
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        spans = _runs(mask)
    else:
        ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        spans = []
        for turn in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompt = messages[:turn]
            start = len(_ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)))
            spans.append((start, len(_ids(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=True)))))
    if loss_on == "last":
        spans = spans[-1:]
    labels = [-100] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of ones."""
    runs, start = [], None
    for i, value in enumerate([*mask, 0]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


@dataclass
class Stats:
    """What happened to the rows: nothing is dropped silently."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    skipped_bad: list[str] = field(default_factory=list)

    def add(self, other: Stats) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped_too_long += other.dropped_too_long
        self.skipped_bad += other.skipped_bad


def truncate(
    ids: list[int], labels: list[int], max_length: int, policy: Truncation, where: str, stats: Stats
) -> tuple[list[int], list[int]] | None:
    if len(ids) <= max_length:
        return ids, labels
    if policy == "error":
        raise RowTooLongError(
            f"{where}: {len(ids)} tokens exceed max_length={max_length} "
            "(set truncation='drop', 'truncate_left' or 'truncate_right')"
        )
    if policy == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    cut = slice(-max_length, None) if policy == "truncate_left" else slice(0, max_length)
    return ids[cut], labels[cut]


def sample_sources(sources: Sequence[tuple[str, list[Any], int | None]], seed: int) -> list[Any]:
    """Megatron-SWIFT's ``path#N``: N rows from a source (with replacement only beyond its size)."""
    rng = random.Random(seed)
    mixed: list[Any] = []
    for name, rows, n in sources:
        if n is None:
            mixed += rows
        elif not rows:
            raise DataFormatError(f"{name}: empty source cannot give {n} samples")
        elif n <= len(rows):
            mixed += rng.sample(rows, n)
        else:
            mixed += rows * (n // len(rows)) + rng.sample(rows, n % len(rows))
    rng.shuffle(mixed)
    return mixed


def pack(
    samples: Iterable[tuple[list[int], list[int]]], seq_length: int, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Greedy in-order packing into ``seq_length`` rows with attention kept inside each sample.

    Each row has ``segment_ids`` (1, 2, ... per sample, 0 for padding) and ``position_ids`` that
    restart at 0 for every sample; ``GPTModule`` turns the segments into a block-diagonal causal
    mask and masks the loss across sample boundaries.
    """
    rows, current = [], []

    def flush() -> None:
        if not current:
            return
        ids, labels, positions, segments = [], [], [], []
        for segment, (sample_ids, sample_labels) in enumerate(current, 1):
            ids += sample_ids
            labels += sample_labels
            positions += range(len(sample_ids))
            segments += [segment] * len(sample_ids)
        padding = seq_length - len(ids)
        rows.append(
            {
                "input_ids": torch.tensor(ids + [pad_id] * padding),
                "labels": torch.tensor(labels + [-100] * padding),
                "position_ids": torch.tensor(positions + [0] * padding),
                "segment_ids": torch.tensor(segments + [0] * padding),
            }
        )
        current.clear()

    used = 0
    for ids, labels in samples:
        if len(ids) > seq_length:
            raise ValueError(f"a sample of {len(ids)} tokens does not fit seq_length={seq_length}; truncate first")
        if used + len(ids) > seq_length:
            flush()
            used = 0
        current.append((ids, labels))
        used += len(ids)
    flush()
    return rows


# ------------------------------------------------------------------------------ preference data
def to_preference(row: dict[str, Any], where: str = "row") -> tuple[list[dict[str, str]], str, str]:
    """``(prompt messages, chosen answer, rejected answer)`` from the common preference shapes:

    - ``{"prompt": str or messages, "chosen": str, "rejected": str}``
    - ``{"messages": [..., {"role": "assistant", <chosen>}], "rejected_response": str}`` (Megatron-SWIFT)
    - ``{"chosen": messages, "rejected": messages}`` sharing the prompt turns (HH-RLHF style)
    - any SFT shape (see :func:`to_messages`) plus ``"rejected_response"``
    """
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got a {type(row).__name__}")
    if isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        chosen, rejected = (
            to_messages({"messages": row[k], "system": row.get("system")}, where) for k in ("chosen", "rejected")
        )
        if chosen[:-1] != rejected[:-1]:
            raise DataFormatError(f"{where}: 'chosen' and 'rejected' conversations differ before the last turn")
        prompt, good, bad = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    elif "prompt" in row and "chosen" in row and "rejected" in row:
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        if row.get("system"):
            prompt = [{"role": "system", "content": row["system"]}, *prompt]
        good, bad = row["chosen"], row["rejected"]
    elif "rejected_response" in row:
        messages = to_messages(row, where)
        prompt, good, bad = messages[:-1], messages[-1]["content"], row["rejected_response"]
    else:
        raise DataFormatError(
            f"{where}: row has keys {sorted(row)}, matching no preference format; expected "
            "'prompt'+'chosen'+'rejected', 'chosen'/'rejected' conversations, or an SFT row with 'rejected_response'"
        )
    if not prompt or prompt[-1]["role"] != "user":
        raise DataFormatError(f"{where}: the prompt must end with a user turn")
    for name, answer in (("chosen", good), ("rejected", bad)):
        if not (answer or "").strip():
            raise DataFormatError(f"{where}: the {name} answer is empty")
    return prompt, good, bad


def render_preference(row: dict[str, Any], tokenizer: Any, where: str = "row") -> dict[str, list[int]]:
    """Token ids and labels of the chosen and rejected conversations (loss on the answer only)."""
    prompt, good, bad = to_preference(row, where)
    out: dict[str, list[int]] = {}
    for name, answer in (("chosen", good), ("rejected", bad)):
        ids, labels = render([*prompt, {"role": "assistant", "content": answer}], tokenizer, loss_on="last")
        out[f"{name}_input_ids"], out[f"{name}_labels"] = ids, labels
    return out


# ------------------------------------------------------------------------------ one row
@dataclass
class RowRenderer:
    """A row -> ``(sample, stats)``: its token ids and labels (``None`` when dropped as too long or,
    with ``lenient``, skipped as bad) and what happened to it. Plain data, so worker processes can
    run it. ``preference`` renders chosen/rejected pairs (:func:`render_preference`) instead.
    """

    tokenizer: Any
    max_length: int
    loss_on: LossOn = "assistant"
    truncation: Truncation = "error"
    lenient: bool = False
    preference: bool = False

    def __call__(self, item: tuple[str, dict[str, Any]]) -> tuple[dict[str, list[int]] | None, Stats]:
        where, row = item
        stats = Stats(rows=1)
        try:
            sample = self._pair(where, row, stats) if self.preference else self._sample(where, row, stats)
        except RowTooLongError:
            raise
        except DataFormatError as error:
            if not self.lenient:
                raise
            stats.skipped_bad.append(str(error))
            return None, stats
        stats.kept += sample is not None
        return sample, stats

    def _sample(self, where: str, row: dict[str, Any], stats: Stats) -> dict[str, list[int]] | None:
        ids, labels = render(to_messages(row, where), self.tokenizer, self.loss_on)
        kept = truncate(ids, labels, self.max_length, self.truncation, where, stats)
        return None if kept is None else {"input_ids": kept[0], "labels": kept[1]}

    def _pair(self, where: str, row: dict[str, Any], stats: Stats) -> dict[str, list[int]] | None:
        pair = render_preference(row, self.tokenizer, where)
        sides = Stats()  # a pair counts once, however many of its sides were cut
        for side in ("chosen", "rejected"):
            ids, labels = f"{side}_input_ids", f"{side}_labels"
            cut = truncate(pair[ids], pair[labels], self.max_length, self.truncation, where, sides)
            if cut is None:
                stats.dropped_too_long += 1
                return None
            pair[ids], pair[labels] = cut
        stats.truncated += bool(sides.truncated)
        return pair
