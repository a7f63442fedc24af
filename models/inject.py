"""The init-inject caption model (Tanti et al.): the image sets the RNN's initial state.

image -> Dropout -> Dense(tanh) -> initial state (h, and c for an LSTM) ─┐
words -> Embedding(mask) -> Dropout ────────────────────────────────────> RNN(return_sequences)
                                                                           -> Dense(relu) -> Dense(vocab, softmax)
"""

from __future__ import annotations

import keras
from keras import layers

from models.config import CaptionModelConfig
from models.decoders import Decoder, register_decoder
from models.decoding import Stepper
from models.merge import embedding_layer, recurrent_layer

# The Dense layers that map an image vector to each part of the recurrent state.
STATE_LAYERS = {"lstm": ("init_h", "init_c"), "gru": ("init_h",)}


def initial_state(config: CaptionModelConfig, vector) -> list:
    """Return the RNN's initial state computed from an image vector: [h] for a GRU, [h, c] for an LSTM."""
    return [layers.Dense(config.units, activation="tanh", name=name)(vector) for name in STATE_LAYERS[config.cell]]


def initial_state_layers(model: keras.Model) -> list[layers.Layer]:
    """Return the trained model's layers made by `initial_state`, in state order."""
    present = {layer.name for layer in model.layers}
    return [model.get_layer(name) for name in STATE_LAYERS["lstm"] if name in present]


def build_inject_model(config: CaptionModelConfig) -> keras.Model:
    """Return the init-inject model: ({"image": (B, D), "words": (B, T)}) -> next-word probabilities (B, T, V)."""
    if config.cell not in STATE_LAYERS:
        raise ValueError(f"unknown cell {config.cell!r}; choose lstm or gru")
    image = keras.Input((config.feature_dim,), name="image")
    words = keras.Input((None,), dtype="int32", name="words")
    state = initial_state(config, layers.Dropout(config.dropout, name="image_dropout")(image))
    text = layers.Dropout(config.dropout, name="text_dropout")(embedding_layer(config)(words))
    text = recurrent_layer(config, return_sequences=True)(text, initial_state=state)
    hidden = layers.Dense(config.units, activation="relu", name="hidden")(text)
    outputs = layers.Dense(config.vocab_size, activation="softmax", name="next_word")(hidden)
    return keras.Model({"image": image, "words": words}, outputs, name="inject_captioner")


class InjectStepper(Stepper):
    """Steps of the init-inject model: the image enters once, as the initial state."""

    def __init__(self, model: keras.Model):
        self.initial = initial_state_layers(model)
        self.cell = model.get_layer("rnn").cell
        super().__init__(model)

    def _start_impl(self, features):
        return [layer(features) for layer in self.initial]

    def _step_impl(self, tokens, state):
        output, state = self.cell(self.word_vectors(tokens), list(state), training=False)
        return self.log_probabilities(output), list(state)


register_decoder(Decoder("inject", build_inject_model, InjectStepper, summary="the image as the RNN's initial state"))
