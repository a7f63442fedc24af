"""A teacher's next-word distributions over the train captions: the soft targets of word-level distillation.

Word-level knowledge distillation (Hinton et al. 2015; Kim and Rush 2016, "word-level"): at every
position of every human train caption, the student learns from the human next word and from the
teacher's distribution over next words, mixed as `(1 - weight) * one-hot + weight * teacher`. Cross-
entropy against that mixture is `(1 - weight)` times the usual loss plus `weight` times the cross-
entropy with the teacher, so one built-in Keras loss (`CategoricalCrossentropy`) trains it.

The teacher's whole distribution (2,533 words for Flickr8k) at the 354,332 positions of 30,000 captions
would be 3.6 GB (float32), so only its `top_k` most likely words are kept, renormalised over the k: flat
arrays, one row per position, captions one after another in the order `encode_captions` gives them. A
digest of the captions' token ids ties the targets to the captions they were computed on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class SoftTargetError(ValueError):
    """Soft targets that do not belong to these captions, or settings out of range."""


def caption_digest(sequences: list[list[int]]) -> str:
    """Return a digest of the captions' token ids, in order (what soft targets are checked against)."""
    digest = hashlib.sha1()
    for sequence in sequences:
        digest.update(np.asarray(sequence, np.int32).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def top_k_rows(probabilities: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most likely word ids of each row of `probabilities` (..., vocabulary), most likely
    first, and their probabilities renormalised to sum to 1."""
    k = min(top_k, probabilities.shape[-1])
    ids = np.argpartition(-probabilities, k - 1, axis=-1)[..., :k]
    kept = np.take_along_axis(probabilities, ids, axis=-1)
    order = np.argsort(-kept, axis=-1, kind="stable")
    ids, kept = np.take_along_axis(ids, order, axis=-1), np.take_along_axis(kept, order, axis=-1)
    total = kept.sum(axis=-1, keepdims=True)
    return ids.astype(np.int32), (kept / np.maximum(total, 1e-12)).astype(np.float32)


@dataclass
class SoftTargets:
    """The teacher's top-k next words at every position of every train caption (positions of caption c:
    rows `offsets[c]` to `offsets[c + 1]`; a caption of n tokens has n - 1 positions)."""

    word_ids: np.ndarray  # (positions, k) int32, ids in the student's vocabulary, most likely first
    probabilities: np.ndarray  # (positions, k) float, each row sums to 1
    positions: np.ndarray  # (captions,) positions per caption
    digest: str  # caption_digest of the captions they were computed on
    weight: float = 0.5  # the teacher's share of each position's target
    facts: dict = field(default_factory=dict)  # what made them, for config.json

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise SoftTargetError(f"the teacher's weight must be in (0, 1], got {self.weight}")
        self.offsets = np.concatenate([[0], np.cumsum(self.positions)]).astype(np.int64)
        if self.offsets[-1] != len(self.word_ids) or self.word_ids.shape != self.probabilities.shape:
            raise SoftTargetError(
                f"{len(self.word_ids)} rows of word ids and {len(self.probabilities)} of probabilities for "
                f"{self.offsets[-1]} caption positions"
            )

    @property
    def top_k(self) -> int:
        return self.word_ids.shape[1]

    def check_captions(self, sequences: list[list[int]]) -> None:
        """Refuse captions other than those the targets were computed on."""
        if len(sequences) != len(self.positions) or caption_digest(sequences) != self.digest:
            raise SoftTargetError(
                f"the soft targets were computed on {len(self.positions)} other captions than these "
                f"{len(sequences)} (another vocabulary, --min-count or --limit-train?)"
            )

    def dense(self, targets: np.ndarray, captions: np.ndarray, vocab_size: int) -> np.ndarray:
        """Return (batch, width, vocabulary) targets for the captions `captions` whose next words are
        `targets` (right-padded with 0): the human word with 1 - weight, the teacher's top k with weight
        (their probabilities); padding all zero."""
        batch, width = targets.shape
        word_ids = np.zeros((batch, width, self.top_k), np.int64)
        probabilities = np.zeros((batch, width, self.top_k), np.float32)
        for row, caption in enumerate(captions):
            start, stop = self.offsets[caption], self.offsets[caption + 1]
            count = min(stop - start, width)
            word_ids[row, :count] = self.word_ids[start : start + count]
            probabilities[row, :count] = self.probabilities[start : start + count]
        dense = np.zeros((batch, width, vocab_size), np.float32)
        np.put_along_axis(dense, word_ids, probabilities * self.weight, axis=2)
        add_human_words(dense, targets, 1.0 - self.weight)
        return dense


def add_human_words(dense: np.ndarray, targets: np.ndarray, share: float) -> None:
    """Add `share` at each position's human next word of `dense` (batch, width, vocabulary); padding
    (target 0) stays all zero."""
    rows, columns = np.nonzero(targets)
    dense[rows, columns, targets[rows, columns]] += share


def one_hot_targets(targets: np.ndarray, vocab_size: int) -> np.ndarray:
    """Return (batch, width, vocabulary) one-hot targets of the next words (padding all zero)."""
    dense = np.zeros((*targets.shape, vocab_size), np.float32)
    add_human_words(dense, targets, 1.0)
    return dense
