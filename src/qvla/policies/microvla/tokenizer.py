"""A word-level tokenizer that ships with the package (no hub download). Unknown words map to <unk>."""
from __future__ import annotations

import json
import re
from pathlib import Path

VOCAB_FILE = Path(__file__).with_name("vocab.json")
PAD, BOS, UNK = 0, 1, 2


class WordTokenizer:
    def __init__(self, tokens: list[str]) -> None:
        if tokens[:3] != ["<pad>", "<bos>", "<unk>"]:
            raise ValueError("vocabulary must start with <pad>, <bos>, <unk>")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def load(cls, path: str | Path = VOCAB_FILE) -> "WordTokenizer":
        return cls(json.loads(Path(path).read_text())["tokens"])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, length: int) -> list[int]:
        """BOS + words, right-padded with PAD (or truncated) to exactly `length` ids."""
        ids = [BOS] + [self.index.get(w, UNK) for w in re.findall(r"[a-z0-9]+", text.lower())]
        return (ids + [PAD] * length)[:length]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if i not in (PAD, BOS))
