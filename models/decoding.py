"""Keras steppers: a trained decoder's one-token step, traced once, for the searches in models.search.

A *stepper* turns image features into an initial decoder state once, then advances all images x
beams by one token per call. Nothing re-reads the growing prefix: each step costs one RNN step,
batched over every image and beam. Each decoder's own stepper lives in its module (models.merge,
models.inject, models.attention); here are the base class and the wrappers that combine them.
"""

from __future__ import annotations

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

    def reorder(self, state: list, indices: np.ndarray) -> list:
        """Return the state with its rows (images x beams) picked by `indices`."""
        return reorder_state(state, indices)


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

    def reorder(self, state: list, indices: np.ndarray) -> list:
        return reorder_state(state, indices)


def reorder_state(state: list, indices: np.ndarray) -> list:
    """Return the state with its rows (images x beams) picked by `indices`."""
    return [tf.gather(part, indices) for part in state]
