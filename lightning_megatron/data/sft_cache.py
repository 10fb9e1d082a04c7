"""An on-disk cache of tokenized rows, keyed by the data, the tokenizer and every rendering option.

A second run with the same files (path, size, modification time), tokenizer (its vocabulary,
merges, special tokens and chat template) and options reads the rows back instead of tokenizing
again; a change to any of them is a different key. Files hold tensors, strings and numbers only,
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # bump when what is cached changes meaning


def file_fingerprint(path: str | Path) -> list[Any]:
    """``[absolute path, size, mtime_ns]``: changes when the file is edited or replaced."""
    path = Path(path)
    if not path.exists():  # reading it will say so, with the path
        return [str(path), None, None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's output: its model (vocabulary, merges, added and
    special tokens, normalizer) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        raise TypeError(f"cannot fingerprint a {type(tokenizer).__name__} for the cache; pass cache_dir=None")
    parts = [
        type(tokenizer).__name__,
        model,
        getattr(tokenizer, "chat_template", None) or "",
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def load(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    path = Path(cache_dir) / f"{key}.pt"
    if not path.exists():
        return None
    stored = torch.load(path, weights_only=True)
    return {name: _decode(value) if name != "stats" else value for name, value in stored.items()}


def save(cache_dir: str | Path, key: str, stats: dict[str, Any], **splits: list[dict[str, list[int]]]) -> Path:
    """Write atomically: concurrent ranks writing the same key leave one whole file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    payload = {name: _encode(samples) for name, samples in splits.items()}
    payload["stats"] = stats
    handle, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(handle)
    torch.save(payload, tmp)
    os.replace(tmp, cache_dir / f"{key}.pt")
    return cache_dir / f"{key}.pt"


def _encode(samples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Each field's sequences concatenated into one tensor, plus their lengths."""
    keys = sorted(samples[0]) if samples else []
    return {
        "count": len(samples),
        **{
            key: {
                "values": torch.tensor([t for s in samples for t in s[key]], dtype=torch.int64),
                "lengths": torch.tensor([len(s[key]) for s in samples], dtype=torch.int64),
            }
            for key in keys
        },
    }


def _decode(encoded: dict[str, Any]) -> list[dict[str, list[int]]]:
    fields = {key: value for key, value in encoded.items() if key != "count"}
    columns = {key: torch.split(f["values"], f["lengths"].tolist()) for key, f in fields.items()}
    return [{key: columns[key][i].tolist() for key in fields} for i in range(encoded["count"])]
