"""Plain text to fixed-length training blocks, and a byte-level tokenizer that needs no download.

This is the smallest real pretraining pipeline: tokenize a corpus, cut it into ``seq_length + 1``
token windows and serve them as ``{"input_ids", "labels"}`` rows (the module shifts labels).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``eos_token_id`` = 256. ``vocab_size`` = 257."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def bundled_corpus() -> str:
    """The small English corpus shipped with the package (a few hundred KB of prose)."""
    return resources.files("lightning_megatron.data").joinpath("corpus.txt").read_text("utf-8")


class TokenBlocks(Dataset):
    """Non-overlapping ``seq_length``-token rows cut from one long token stream.

    Args:
        tokens: the token stream (documents joined with an end-of-sequence token).
        seq_length: tokens per row.
    """

    def __init__(self, tokens: list[int] | torch.Tensor, seq_length: int) -> None:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        n = len(tokens) // seq_length
        if n == 0:
            raise ValueError(
                f"{len(tokens)} tokens make no row of seq_length={seq_length}; use more text or a shorter seq_length"
            )
        self.rows = tokens[: n * seq_length].view(n, seq_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row}

    @classmethod
    def from_text(cls, text: str | Path, tokenizer, seq_length: int) -> TokenBlocks:
        """Tokenize ``text`` (a string, or a path to a UTF-8 file) paragraph by paragraph."""
        if isinstance(text, Path):
            text = text.read_text("utf-8")
        tokens: list[int] = []
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                tokens.extend(tokenizer.encode(paragraph.strip()))
                tokens.append(tokenizer.eos_token_id)
        return cls(tokens, seq_length)
