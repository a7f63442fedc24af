"""Caption decoding: greedy and batched beam search over a step function that carries the RNN state.

A *stepper* turns image features into an initial decoder state once, then advances all images x
beams by one token per call. Nothing here re-reads the growing prefix: each step costs one RNN
step, batched over every image and beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


class Stepper:
    """One-token steps of a trained decoder, sharing its layers (and so its weights).

    Every decoder's stepper has the same interface, so greedy and beam search work with any of them:
    `start(features) -> state` and `step(tokens, state) -> (log-probabilities (B, V), state)`, where
    the state is a list of tensors whose rows are images x beams. Subclasses trace `_start_impl` and
    `_step_impl`; the last two layers of every decoder are `hidden` and `next_word`.
    """

    def __init__(self, model: keras.Model):
        self.embedding = model.get_layer("embedding")
        self.hidden = model.get_layer("hidden")
        self.next_word = model.get_layer("next_word")
        self._start = tf.function(self._start_impl, reduce_retracing=True)
        self._step = tf.function(self._step_impl, reduce_retracing=True)

    def word_vectors(self, tokens):
        # Look the vectors up directly: calling the Embedding layer would attach a mask the cell ignores.
        return tf.gather(self.embedding.embeddings, tokens)

    def log_probabilities(self, hidden_input):
        """Return next-word log-probabilities (B, V) from what the model feeds its `hidden` layer."""
        logits = tf.matmul(self.hidden(hidden_input), self.next_word.kernel) + self.next_word.bias
        return tf.nn.log_softmax(logits)

    def _start_impl(self, features):
        raise NotImplementedError

    def _step_impl(self, tokens, state):
        raise NotImplementedError

    def start(self, features: np.ndarray) -> list:
        """Return the initial decoder state for a batch of image features."""
        return self._start(tf.convert_to_tensor(features, tf.float32))

    def step(self, tokens: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        """Return (log-probabilities of the next word (B, V), the new state) after feeding `tokens`."""
        log_probs, state = self._step(tf.convert_to_tensor(tokens, tf.int32), state)[:2]
        return log_probs.numpy(), state


class MergeStepper(Stepper):
    """Steps of the merge model: the image vector is added to the RNN output at every step."""

    def __init__(self, model: keras.Model):
        self.image_dense = model.get_layer("image_dense")
        self.cell = model.get_layer("rnn").cell
        self.is_lstm = isinstance(model.get_layer("rnn"), keras.layers.LSTM)
        super().__init__(model)

    def _start_impl(self, features):
        context = self.image_dense(features)
        zeros = tf.zeros((tf.shape(features)[0], self.cell.units))
        return [context, zeros, zeros] if self.is_lstm else [context, zeros]

    def _step_impl(self, tokens, state):
        context, recurrent = state[0], list(state[1:])
        output, recurrent = self.cell(self.word_vectors(tokens), recurrent, training=False)
        return self.log_probabilities(context + output), [context, *recurrent]


class PooledStepper(Stepper):
    """A decoder that reads pooled vectors, fed spatial maps (B, H, W, C): it pools them itself.

    The pool is the mean over the map's positions, which is the encoder's pooled vector wherever that is
    a global average pool of the map (`EncoderSpec.pools_spatial_map`). It lets vector decoders join
    an ensemble with attention decoders, all reading the same maps.
    """

    def __init__(self, inner: Stepper):
        self.inner = inner
        self._start = tf.function(self._start_impl, reduce_retracing=True)
        self._step = inner._step

    def _start_impl(self, features):
        return self.inner._start_impl(tf.reduce_mean(features, axis=[1, 2]))

    def _step_impl(self, tokens, state):
        return self.inner._step_impl(tokens, state)


class EnsembleStepper:
    """Several decoders over one vocabulary, stepped together as one model.

    The next-word distribution is the mean of the members' (log of the mean probability, not the
    mean log-probability), so greedy and beam search work on the ensemble as on any one decoder. The
    state is the members' states, concatenated. Every member reads the same image features. One step
    of all members is one traced TensorFlow call, as for a single decoder.
    """

    def __init__(self, steppers: list[Stepper]):
        if not steppers:
            raise ValueError("an ensemble needs at least one decoder")
        self.steppers = list(steppers)
        self._sizes: list[int] | None = None  # state tensors per member, known after the first start
        self._step = tf.function(self._step_impl, reduce_retracing=True)

    def start(self, features: np.ndarray) -> list:
        states = [list(stepper.start(features)) for stepper in self.steppers]
        self._sizes = [len(state) for state in states]
        return [part for state in states for part in state]

    def _step_impl(self, tokens, state):
        log_probs, new_state, at = [], [], 0
        for stepper, size in zip(self.steppers, self._sizes, strict=True):
            member_log_probs, member_state = stepper._step_impl(tokens, state[at : at + size])[:2]
            log_probs.append(member_log_probs)
            new_state += list(member_state)
            at += size
        mean = tf.reduce_logsumexp(tf.stack(log_probs), axis=0) - np.log(len(log_probs))
        return mean, new_state

    def step(self, tokens: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        log_probs, state = self._step(tf.convert_to_tensor(tokens, tf.int32), state)
        return log_probs.numpy(), state


def reorder_state(state: list, indices: np.ndarray) -> list:
    """Return the state with its rows (images x beams) picked by `indices`."""
    return [tf.gather(part, indices) for part in state]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, ending with <end> when finished
    log_prob: float
    score: float  # log_prob after length normalisation, used for ranking


def greedy_decode(
    stepper,
    features: np.ndarray,
    max_length: int,
    start_id: int = 2,
    end_id: int = 3,
    banned_ids: tuple[int, ...] = (0, 1, 2),
) -> list[list[int]]:
    """Return the most probable next word at every step, for each image (ids, ending with <end>)."""
    batch = len(features)
    state = stepper.start(features)
    tokens = np.full(batch, start_id, dtype=np.int32)
    sequences = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_length - 1):
        log_probs, state = stepper.step(tokens, state)
        log_probs[:, list(banned_ids)] = -np.inf
        tokens = log_probs.argmax(axis=1).astype(np.int32)
        for i in np.flatnonzero(~done):
            sequences[i].append(int(tokens[i]))
        done |= tokens == end_id
        if done.all():
            break
    return sequences


def beam_search(
    stepper,
    features: np.ndarray,
    beam_size: int = 3,
    max_length: int = 40,
    length_penalty: float = 0.0,
    start_id: int = 2,
    end_id: int = 3,
    pad_id: int = 0,
    banned_ids: tuple[int, ...] = (0, 1, 2),
    no_repeat_ngram: int = 0,
) -> list[list[Hypothesis]]:
    """Return each image's `beam_size` best captions, best first, decoded together in one batch.

    Scores are summed log-probabilities divided by length ** `length_penalty` (0 = none).
    `<pad>`, `<unk>` and `<start>` are never generated. With `no_repeat_ngram` N >= 2, no caption
    contains the same N consecutive tokens twice (a word that would repeat one is not generated).
    """
    batch, k = len(features), beam_size
    state = stepper.start(np.repeat(np.asarray(features, dtype=np.float32), k, axis=0))
    tokens = np.full(batch * k, start_id, dtype=np.int32)
    scores = np.full((batch, k), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sequences = np.zeros((batch, k, 0), dtype=np.int64)
    finished = np.zeros((batch, k), dtype=bool)
    lengths = np.zeros((batch, k))
    offsets = (np.arange(batch) * k)[:, None]
    for _ in range(max_length - 1):
        log_probs, state = stepper.step(tokens, state)
        vocab = log_probs.shape[1]
        log_probs = log_probs.reshape(batch, k, vocab).astype(np.float64)
        log_probs[..., list(banned_ids)] = -np.inf
        if no_repeat_ngram >= 2:
            _block_repeated_ngrams(log_probs, sequences, no_repeat_ngram)
        # A finished beam continues only with <pad>, at no cost, so it keeps its score and slot.
        log_probs[finished] = -np.inf
        log_probs[finished, pad_id] = 0.0
        total = (scores[..., None] + log_probs).reshape(batch, k * vocab)
        top = np.argpartition(-total, k - 1, axis=1)[:, :k] if k < total.shape[1] else np.tile(np.arange(k), (batch, 1))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(total, top, axis=1), axis=1), axis=1)
        beam, word = top // vocab, top % vocab
        scores = np.take_along_axis(total, top, axis=1)
        lengths = np.take_along_axis(lengths + ~finished, beam, axis=1)
        finished = np.take_along_axis(finished, beam, axis=1) | (word == end_id)
        sequences = np.concatenate([np.take_along_axis(sequences, beam[..., None], axis=1), word[..., None]], axis=2)
        state = reorder_state(state, (beam + offsets).reshape(-1))
        tokens = word.reshape(-1).astype(np.int32)
        if finished.all():
            break
    results = []
    for i in range(batch):
        hypotheses = []
        for j in range(k):
            if not np.isfinite(scores[i, j]):
                continue
            ids = [int(t) for t in sequences[i, j] if t != pad_id]
            norm = max(lengths[i, j], 1.0) ** length_penalty
            hypotheses.append(Hypothesis(ids, float(scores[i, j]), float(scores[i, j] / norm)))
        results.append(sorted(hypotheses, key=lambda h: -h.score))
    return results


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
    stepper,
    features: np.ndarray,
    samples: int,
    max_length: int,
    rng: np.random.Generator,
    start_id: int = 2,
    end_id: int = 3,
    banned_ids: tuple[int, ...] = (0, 1, 2),
) -> np.ndarray:
    """Return `samples` captions drawn from the model's distribution for each image, all in one batch.

    Rows are image-major (image 0's samples first), shape (len(features) * samples, max_length); each
    caption ends with `<end>` unless cut at `max_length`, and is padded with 0 after it. Words are drawn
    with the Gumbel-max trick: argmax(log p + Gumbel noise) is a draw from p.
    """
    rows = len(features) * samples
    state = stepper.start(np.repeat(np.asarray(features, dtype=np.float32), samples, axis=0))
    tokens = np.full(rows, start_id, dtype=np.int32)
    captions = np.zeros((rows, max_length), dtype=np.int32)
    done = np.zeros(rows, dtype=bool)
    for t in range(max_length):
        log_probs, state = stepper.step(tokens, state)
        log_probs[:, list(banned_ids)] = -np.inf
        tokens = np.argmax(log_probs + rng.gumbel(size=log_probs.shape), axis=1).astype(np.int32)
        tokens[done] = 0  # a finished caption is fed padding; its further outputs are never used
        captions[:, t] = tokens
        done |= tokens == end_id
        if done.all():
            break
    return captions
