"""The merge caption model (Tanti et al.): the image joins the language model only after the RNN.

image -> Dropout -> Dense(relu) ─┐
                                 add -> Dense(relu) -> Dense(vocab, softmax)
words -> Embedding(mask) -> Dropout -> RNN(return_sequences) ─┘
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from models.config import CaptionModelConfig
from models.decoders import Decoder, register_decoder
from models.decoding import Stepper


def recurrent_layer(config: CaptionModelConfig, **kwargs) -> layers.Layer:
    """Return the configured recurrent layer (LSTM or GRU) with `units` units."""
    cells = {"lstm": layers.LSTM, "gru": layers.GRU}
    if config.cell not in cells:
        raise ValueError(f"unknown cell {config.cell!r}; choose lstm or gru")
    return cells[config.cell](config.units, name="rnn", **kwargs)


def embedding_layer(config: CaptionModelConfig) -> layers.Layer:
    """Return the word embedding (id 0 = padding, masked), frozen when the config asks for fixed vectors."""
    return layers.Embedding(
        config.vocab_size,
        config.embedding_dim,
        mask_zero=True,
        trainable=not config.freeze_embeddings,
        name="embedding",
    )


def build_merge_model(config: CaptionModelConfig) -> keras.Model:
    """Return the merge model: ({"image": (B, D), "words": (B, T)}) -> next-word probabilities (B, T, V)."""
    image = keras.Input((config.feature_dim,), name="image")
    words = keras.Input((None,), dtype="int32", name="words")
    image_vector = layers.Dense(config.units, activation="relu", name="image_dense")(
        layers.Dropout(config.dropout, name="image_dropout")(image)
    )
    text = embedding_layer(config)(words)
    text = layers.Dropout(config.dropout, name="text_dropout")(text)
    text = recurrent_layer(config, return_sequences=True)(text)
    # The image vector is the same at every position: broadcast it along time before adding.
    merged = layers.Add(name="merge")([BroadcastTime(name="image_broadcast")([image_vector, text]), text])
    hidden = layers.Dense(config.units, activation="relu", name="hidden")(merged)
    outputs = layers.Dense(config.vocab_size, activation="softmax", name="next_word")(hidden)
    return keras.Model({"image": image, "words": words}, outputs, name="merge_captioner")


@keras.saving.register_keras_serializable(package="captioning")
class BroadcastTime(layers.Layer):
    """Repeats a (B, D) vector along the time axis of a (B, T, ...) reference, keeping its mask."""

    def call(self, inputs):
        vector, reference = inputs
        shape = keras.ops.shape(reference)
        return keras.ops.broadcast_to(keras.ops.expand_dims(vector, 1), (shape[0], shape[1], vector.shape[-1]))

    def compute_mask(self, inputs, mask=None):
        return None if mask is None else mask[1]


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


register_decoder(Decoder("merge", build_merge_model, MergeStepper, summary="the image added after the RNN"))
