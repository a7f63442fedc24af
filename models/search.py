"""Decoding a caption word by word: greedy, batched beam search and sampling, over any stepper.

Nothing here imports TensorFlow: a *stepper* owns the model. It turns image features into an initial
decoder state once (`start`), advances every image x beam by one token per call (`step`: token ids
and state -> next-word log-probabilities (B, V) as numpy, new state), and picks state rows when beams
are reordered (`reorder`). The Keras steppers (models.decoding and each decoder's module) and any
other runtime implement the same three methods, so every runtime decodes with this one search.

The settings travel together as one `DecodingOptions`; the special-token ids come from the
vocabulary as one `SpecialTokens`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np


class Stepper(Protocol):
    def start(self, features: np.ndarray) -> list: ...

    def step(self, tokens: np.ndarray, state: list) -> tuple[np.ndarray, list]: ...

    def reorder(self, state: list, indices: np.ndarray) -> list: ...


@dataclass(frozen=True)
class SpecialTokens:
    """The vocabulary's special-token ids that decoding must know."""

    pad: int
    unk: int
    start: int
    end: int

    @classmethod
    def of(cls, vocabulary) -> SpecialTokens:
        """Return the ids of a `pipeline.vocabulary.Vocabulary` (or anything with its `*_id` attributes)."""
        return cls(vocabulary.pad_id, vocabulary.unk_id, vocabulary.start_id, vocabulary.end_id)

    @property
    def never_generated(self) -> list[int]:
        """`<pad>`, `<unk>` and `<start>`: ids a caption never contains."""
        return [self.pad, self.unk, self.start]


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are decoded: one object from the command line to the search, one default each.

    `max_length` None means the run's longest train caption; `length_penalty` A ranks beams by
    log P / length**A; `no_repeat_ngram` N >= 2 never generates a word that repeats N consecutive
    tokens (0: off). The defaults (length penalty 1, trigram block) gave the shipped model its best
    BLEU-4, METEOR and CIDEr on Flickr8k dev of the four settings tried (BENCHMARKS.md, chosen on dev).
    """

    beam: int = 3
    max_length: int | None = None
    length_penalty: float = 1.0
    no_repeat_ngram: int = 3

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam must be at least 1, got {self.beam}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end), got {self.max_length}")
        if self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            raise ValueError(f"no_repeat_ngram must be 0 (off) or at least 2, got {self.no_repeat_ngram}")

    def with_max_length(self, max_length: int) -> DecodingOptions:
        """Return these options with `max_length` filled in where it was left to the run."""
        return self if self.max_length is not None else replace(self, max_length=max_length)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, ending with <end> when finished
    log_prob: float
    score: float  # log_prob after length normalisation, used for ranking


def _required_length(options: DecodingOptions) -> int:
    if options.max_length is None:
        raise ValueError("the decoding options need a max_length here (DecodingOptions.with_max_length)")
    return options.max_length


def greedy_decode(stepper: Stepper, features: np.ndarray, max_length: int, tokens: SpecialTokens) -> list[list[int]]:
    """Return the most probable next word at every step, for each image (ids, ending with <end>)."""
    batch = len(features)
    state = stepper.start(features)
    current = np.full(batch, tokens.start, dtype=np.int32)
    sequences = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_length - 1):
        log_probs, state = stepper.step(current, state)
        log_probs[:, tokens.never_generated] = -np.inf
        current = log_probs.argmax(axis=1).astype(np.int32)
        for i in np.flatnonzero(~done):
            sequences[i].append(int(current[i]))
        done |= current == tokens.end
        if done.all():
            break
    return sequences


def beam_search(
    stepper: Stepper, features: np.ndarray, options: DecodingOptions, tokens: SpecialTokens
) -> list[list[Hypothesis]]:
    """Return each image's `options.beam` best captions, best first, decoded together in one batch.

    Scores are summed log-probabilities divided by length ** `length_penalty` (0 = none).
    `<pad>`, `<unk>` and `<start>` are never generated. With `no_repeat_ngram` N >= 2, no caption
    contains the same N consecutive tokens twice (a word that would repeat one is not generated).
    """
    batch, k = len(features), options.beam
    state = stepper.start(np.repeat(np.asarray(features, dtype=np.float32), k, axis=0))
    current = np.full(batch * k, tokens.start, dtype=np.int32)
    scores = np.full((batch, k), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sequences = np.zeros((batch, k, 0), dtype=np.int64)
    finished = np.zeros((batch, k), dtype=bool)
    lengths = np.zeros((batch, k))
    offsets = (np.arange(batch) * k)[:, None]
    for _ in range(_required_length(options) - 1):
        log_probs, state = stepper.step(current, state)
        vocab = log_probs.shape[1]
        log_probs = log_probs.reshape(batch, k, vocab).astype(np.float64)
        log_probs[..., tokens.never_generated] = -np.inf
        if options.no_repeat_ngram >= 2:
            _block_repeated_ngrams(log_probs, sequences, options.no_repeat_ngram)
        # A finished beam continues only with <pad>, at no cost, so it keeps its score and slot.
        log_probs[finished] = -np.inf
        log_probs[finished, tokens.pad] = 0.0
        total = (scores[..., None] + log_probs).reshape(batch, k * vocab)
        top = np.argpartition(-total, k - 1, axis=1)[:, :k] if k < total.shape[1] else np.tile(np.arange(k), (batch, 1))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(total, top, axis=1), axis=1), axis=1)
        beam, word = top // vocab, top % vocab
        scores = np.take_along_axis(total, top, axis=1)
        lengths = np.take_along_axis(lengths + ~finished, beam, axis=1)
        finished = np.take_along_axis(finished, beam, axis=1) | (word == tokens.end)
        sequences = np.concatenate([np.take_along_axis(sequences, beam[..., None], axis=1), word[..., None]], axis=2)
        state = stepper.reorder(state, (beam + offsets).reshape(-1))
        current = word.reshape(-1).astype(np.int32)
        if finished.all():
            break
    return [_ranked(scores[i], sequences[i], lengths[i], options.length_penalty, tokens.pad) for i in range(batch)]


def _ranked(
    scores: np.ndarray, sequences: np.ndarray, lengths: np.ndarray, length_penalty: float, pad: int
) -> list[Hypothesis]:
    """Return one image's finite-scored beams as hypotheses, best length-normalised score first."""
    hypotheses = []
    for score, sequence, length in zip(scores, sequences, lengths, strict=True):
        if np.isfinite(score):
            norm = max(length, 1.0) ** length_penalty
            hypotheses.append(Hypothesis([int(t) for t in sequence if t != pad], float(score), float(score / norm)))
    return sorted(hypotheses, key=lambda h: -h.score)


def _block_repeated_ngrams(log_probs: np.ndarray, sequences: np.ndarray, n: int) -> None:
    """Set to -inf, in place, each word that would end an n-gram already in its beam's sequence.

    `log_probs` (batch, beams, vocab); `sequences` (batch, beams, t), the tokens generated so far.
    """
    if sequences.shape[2] < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(sequences, n, axis=2)  # (batch, beams, t - n + 1, n)
    prefix = sequences[:, :, None, sequences.shape[2] - (n - 1) :]  # the last n - 1 tokens
    image, beam, position = np.nonzero((windows[..., : n - 1] == prefix).all(axis=3))
    log_probs[image, beam, windows[image, beam, position, n - 1]] = -np.inf


def sample_captions(
    stepper: Stepper,
    features: np.ndarray,
    samples: int,
    max_length: int,
    rng: np.random.Generator,
    tokens: SpecialTokens,
) -> np.ndarray:
    """Return `samples` captions drawn from the model's distribution for each image, all in one batch.

    Rows are image-major (image 0's samples first), shape (len(features) * samples, max_length); each
    caption ends with `<end>` unless cut at `max_length`, and is padded with `<pad>` after it. Words
    are drawn with the Gumbel-max trick: argmax(log p + Gumbel noise) is a draw from p.
    """
    rows = len(features) * samples
    state = stepper.start(np.repeat(np.asarray(features, dtype=np.float32), samples, axis=0))
    current = np.full(rows, tokens.start, dtype=np.int32)
    captions = np.full((rows, max_length), tokens.pad, dtype=np.int32)
    done = np.zeros(rows, dtype=bool)
    for t in range(max_length):
        log_probs, state = stepper.step(current, state)
        log_probs[:, tokens.never_generated] = -np.inf
        current = np.argmax(log_probs + rng.gumbel(size=log_probs.shape), axis=1).astype(np.int32)
        current[done] = tokens.pad  # a finished caption is fed padding; its further outputs are never used
        captions[:, t] = current
        done |= current == tokens.end
        if done.all():
            break
    return captions
