"""Pretrained word vectors in the GloVe text format, and the embedding matrix they give a vocabulary.

A GloVe file (e.g. glove.6B.300d.txt) has one `word v1 v2 ... vD` line per word, separated by single
spaces; every line has the same D. A word2vec text file is the same with a `COUNT D` header line,
which is skipped. Only the vectors of the words asked for are kept, so a 400,000-word file costs
memory for the vocabulary only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.vocabulary import SPECIAL_TOKENS, Vocabulary


class WordVectorError(ValueError):
    """A word-vector file that is missing or malformed."""


@dataclass
class WordVectors:
    dim: int
    vectors: dict[str, np.ndarray]  # word -> float32 (dim,)
    path: Path


@dataclass
class EmbeddingCoverage:
    """How much of a vocabulary the pretrained vectors cover (special tokens not counted)."""

    found: int
    words: int
    missing: list[str]  # vocabulary words without a vector, most frequent first

    @property
    def fraction(self) -> float:
        return self.found / self.words if self.words else 0.0

    def to_dict(self) -> dict:
        return {
            "found": self.found,
            "words": self.words,
            "coverage": round(self.fraction, 4),
            "missing_examples": self.missing[:20],
        }


def read_word_vectors(path: str | Path, words: set[str] | None = None) -> WordVectors:
    """Return the vectors of `words` (all words if None) from a GloVe-format text file.

    Raises `WordVectorError` naming the file and line for a line without the file's dimension or with
    a value that is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise WordVectorError(f"{path}: no such word-vector file")
    dim, vectors = None, {}
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.rstrip(" ").split(" ")
                if number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                    continue  # word2vec header: COUNT DIM
                if dim is None:
                    dim = len(fields) - 1
                    if dim < 1:
                        raise WordVectorError(f"{path}:{number}: expected 'word v1 v2 ...', got {line[:60]!r}")
                if len(fields) != dim + 1:
                    raise WordVectorError(
                        f"{path}:{number}: expected a word and {dim} numbers, got {len(fields) - 1} "
                        f"values in {line[:60]!r}"
                    )
                word = fields[0]
                if (words is None or word in words) and word not in vectors:
                    try:
                        vectors[word] = np.array(fields[1:], dtype=np.float32)
                    except ValueError:
                        raise WordVectorError(f"{path}:{number}: a value of {word!r} is not a number") from None
        except UnicodeDecodeError as error:
            raise WordVectorError(f"{path}: not UTF-8 text ({error})") from None
    if dim is None:
        raise WordVectorError(f"{path}: no word vectors in the file")
    return WordVectors(dim, vectors, path)


def embedding_matrix(
    vocabulary: Vocabulary, vectors: WordVectors, initial: np.ndarray
) -> tuple[np.ndarray, EmbeddingCoverage]:
    """Return (`initial` with the rows of words that have a pretrained vector replaced, the coverage)."""
    if initial.shape != (len(vocabulary), vectors.dim):
        raise WordVectorError(f"{vectors.path}: {vectors.dim}-d vectors for an embedding of shape {initial.shape}")
    matrix = np.array(initial, dtype=np.float32)
    found, missing = 0, []
    for index, word in enumerate(vocabulary.words):
        if word in SPECIAL_TOKENS:
            continue
        if word in vectors.vectors:
            matrix[index] = vectors.vectors[word]
            found += 1
        else:
            missing.append(word)
    return matrix, EmbeddingCoverage(found, len(vocabulary) - len(SPECIAL_TOKENS), missing)
