"""The word vocabulary, built from training captions and saved as versioned JSON."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from features.store import atomic_write_bytes, read_versioned_json

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)  # ids 0..3; padding must be 0 for Keras masking
FORMAT_NAME = "captioning-vocabulary"
FORMAT_VERSION = 1


class VocabularyError(ValueError):
    """A vocabulary file that is missing or malformed."""


@dataclass
class Vocabulary:
    words: list[str]  # index = token id; the first four are SPECIAL_TOKENS
    min_count: int

    def __post_init__(self) -> None:
        self.index = {word: i for i, word in enumerate(self.words)}

    pad_id, unk_id, start_id, end_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[list[str]], min_count: int = 5) -> Vocabulary:
        """Return a vocabulary of the words seen at least `min_count` times, most frequent first."""
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept, min_count)

    def encode(self, words: list[str]) -> list[int]:
        """Return `<start> words <end>` as token ids, unknown words as `<unk>`."""
        return [self.start_id] + [self.index.get(w, self.unk_id) for w in words] + [self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Return the words of `ids`, stopping at `<end>` and leaving out special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= len(SPECIAL_TOKENS):
                words.append(self.words[i])
        return words

    def save(self, path: str | Path) -> None:
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "min_count": self.min_count, "words": self.words}
        atomic_write_bytes(Path(path), json.dumps(payload, indent=0).encode())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            payload = read_versioned_json(
                path, FORMAT_NAME, FORMAT_VERSION, "vocabulary written by this project", VocabularyError
            )
        except FileNotFoundError:
            raise VocabularyError(f"{path}: no vocabulary file") from None
        words = payload.get("words")
        if not isinstance(words, list) or tuple(words[:4]) != SPECIAL_TOKENS:
            raise VocabularyError(f"{path}: word list missing or without the special tokens first")
        return cls(words, int(payload.get("min_count", 0)))
