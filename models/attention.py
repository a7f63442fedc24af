"""The soft-attention caption model (Xu et al., Show, Attend and Tell) over the encoder's spatial map.

regions (H, W, C) -> (H*W, C) -> Dropout -> Dense(relu) ─┬─ mean -> Dense(tanh) -> initial state
                                                        └─ every step: additive attention, conditioned on
                                                           the previous state, gives weights over the
                                                           regions and a gated context vector
words -> Embedding(mask) -> Dropout -> [word; context] -> LSTM/GRU cell -> [h; context] -> Dense(relu)
                                                                                   -> Dense(vocab, softmax)

Training adds the doubly stochastic regularisation: weight * mean over regions of
(1 - sum over real words of the region's attention)^2. It is a training-time penalty only, so the
dev loss stays the plain per-word cross-entropy, comparable with the other decoders.
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from features.store import atomic_write_bytes
from models.config import CaptionModelConfig
from models.decoders import Decoder, register_decoder
from models.decoding import Stepper
from models.inject import initial_state, initial_state_layers
from models.merge import embedding_layer


@keras.saving.register_keras_serializable(package="captioning")
class AttentionDecoder(layers.Layer):
    """The recurrent loop of the attention model: ([words (B, T, E), regions (B, L, D), *state]) ->
    (outputs [h; context] (B, T, units + D), attention weights (B, T, L)).

    `step` is one time step; `call` runs it over the sequence, and the decoding stepper calls the
    same `step`, so training and beam search cannot disagree. Padded steps keep their state.
    """

    def __init__(self, units: int, attention_units: int, cell: str = "lstm", regularization: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        cells = {"lstm": layers.LSTMCell, "gru": layers.GRUCell}
        if cell not in cells:
            raise ValueError(f"unknown cell {cell!r}; choose lstm or gru")
        self.units = units
        self.attention_units = attention_units
        self.cell_type = cell
        self.regularization = regularization  # weight of the doubly stochastic penalty, 0 = none
        self.cell = cells[cell](units, name="cell")
        self.attention_keys = layers.Dense(attention_units, name="attention_keys")
        self.attention_query = layers.Dense(attention_units, use_bias=False, name="attention_query")
        self.attention_score = layers.Dense(1, name="attention_score")
        self.context_gate = None  # sized by the regions, in build

    def build(self, input_shape):
        words_shape, regions_shape = input_shape[0], input_shape[1]
        region_dim = regions_shape[-1]
        # Sub-layers are built here, not lazily, so a loaded model has every variable to restore into.
        self.context_gate = layers.Dense(region_dim, activation="sigmoid", name="context_gate")
        self.attention_keys.build(regions_shape)
        self.attention_query.build((None, self.units))
        self.attention_score.build((None, regions_shape[1], self.attention_units))
        self.context_gate.build((None, self.units))
        self.cell.build((None, words_shape[-1] + region_dim))

    def keys(self, regions):
        """Return the projected regions the attention compares against (computed once per image)."""
        return self.attention_keys(regions)

    def attend(self, regions, keys, query):
        """Return (context (B, D), weights (B, L)): a softmax over the regions, scored against `query`."""
        energy = keras.ops.tanh(keys + keras.ops.expand_dims(self.attention_query(query), 1))
        weights = keras.ops.softmax(keras.ops.squeeze(self.attention_score(energy), -1), axis=-1)
        return keras.ops.einsum("bl,bld->bd", weights, regions), weights

    def step(self, word_vectors, state: list, regions, keys, training=False):
        """Return (output h, gated context, attention weights, new state) after one word."""
        context, weights = self.attend(regions, keys, state[0])
        context = self.context_gate(state[0]) * context  # the gate beta of Show, Attend and Tell
        output, state = self.cell(keras.ops.concatenate([word_vectors, context], -1), state, training=training)
        return output, context, weights, list(state) if isinstance(state, list | tuple) else [state]

    def call(self, inputs, mask=None, training=None):
        words, regions, *state = inputs
        word_mask = mask[0] if isinstance(mask, list | tuple) else mask
        if word_mask is None:
            word_mask = tf.ones(tf.shape(words)[:2], tf.bool)
        keys = self.keys(regions)
        batch = tf.shape(words)[0]

        def one_step(carry, x):
            previous = carry[0]
            word, real = x
            output, context, weights, new_state = self.step(word, previous, regions, keys, training)
            new_state = [tf.where(real[:, None], n, p) for n, p in zip(new_state, previous, strict=True)]
            return new_state, output, context, weights

        initial = (
            list(state),
            tf.zeros((batch, self.units)),
            tf.zeros((batch, regions.shape[-1])),
            tf.zeros((batch, tf.shape(regions)[1])),
        )
        _, outputs, contexts, weights = tf.scan(
            one_step, (tf.transpose(words, [1, 0, 2]), tf.transpose(word_mask, [1, 0])), initializer=initial
        )
        outputs = tf.transpose(tf.concat([outputs, contexts], -1), [1, 0, 2])
        weights = tf.transpose(weights, [1, 0, 2])
        if training and self.regularization:
            coverage = tf.reduce_sum(weights * tf.cast(word_mask, weights.dtype)[..., None], axis=1)
            self.add_loss(self.regularization * tf.reduce_mean(tf.square(1.0 - coverage)))
        return outputs, weights

    def compute_output_shape(self, input_shape):
        words_shape, regions_shape = input_shape[0], input_shape[1]
        batch, time = words_shape[0], words_shape[1]
        return (batch, time, self.units + regions_shape[-1]), (batch, time, regions_shape[1])

    def compute_mask(self, inputs, mask=None):
        word_mask = mask[0] if isinstance(mask, list | tuple) else mask
        return [word_mask, word_mask]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "attention_units": self.attention_units,
            "cell": self.cell_type,
            "regularization": self.regularization,
        }


def build_attention_model(config: CaptionModelConfig) -> keras.Model:
    """Return the attention model: ({"regions": (B, H, W, C), "words": (B, T)}) -> probabilities (B, T, V)."""
    if config.spatial_shape is None:
        raise ValueError("the attention decoder needs spatial_shape (H, W, C) of the encoder's spatial map")
    height, width, channels = config.spatial_shape
    regions_input = keras.Input(tuple(config.spatial_shape), name="regions")
    words = keras.Input((None,), dtype="int32", name="words")
    regions = layers.Reshape((height * width, channels), name="region_list")(regions_input)
    regions = layers.Dropout(config.dropout, name="region_dropout")(regions)
    regions = layers.Dense(config.units, activation="relu", name="region_dense")(regions)
    state = initial_state(config, layers.GlobalAveragePooling1D(name="region_mean")(regions))
    text = layers.Dropout(config.dropout, name="text_dropout")(embedding_layer(config)(words))
    decoder = AttentionDecoder(
        config.units, config.units, config.cell, config.attention_regularization, name="attention_decoder"
    )
    outputs, _ = decoder([text, regions, *state])
    hidden = layers.Dense(config.units, activation="relu", name="hidden")(outputs)
    probabilities = layers.Dense(config.vocab_size, activation="softmax", name="next_word")(hidden)
    return keras.Model({"regions": regions_input, "words": words}, probabilities, name="attention_captioner")


class AttentionStepper(Stepper):
    """Steps of the attention model; features are spatial maps (B, H, W, C).

    The state is [regions, keys, *recurrent state]; `step_with_attention` also gives the weights.
    """

    def __init__(self, model: keras.Model):
        self.region_list = model.get_layer("region_list")
        self.region_dense = model.get_layer("region_dense")
        self.initial = initial_state_layers(model)
        self.decoder = model.get_layer("attention_decoder")
        super().__init__(model)

    def _start_impl(self, features):
        regions = self.region_dense(self.region_list(features))
        vector = tf.reduce_mean(regions, axis=1)
        return [regions, self.decoder.keys(regions), *[layer(vector) for layer in self.initial]]

    def _step_impl(self, tokens, state):
        regions, keys, recurrent = state[0], state[1], list(state[2:])
        output, context, weights, recurrent = self.decoder.step(self.word_vectors(tokens), recurrent, regions, keys)
        return self.log_probabilities(tf.concat([output, context], -1)), [regions, keys, *recurrent], weights

    def step_with_attention(self, tokens: np.ndarray, state: list) -> tuple[np.ndarray, list, np.ndarray]:
        """Return (log-probabilities (B, V), new state, attention weights over the regions (B, L))."""
        log_probs, state, weights = self._step(tf.convert_to_tensor(tokens, tf.int32), state)
        return log_probs.numpy(), state, weights.numpy()

    def attention_weights(self, features: np.ndarray, captions: list[list[int]], start_id: int) -> list[np.ndarray]:
        """Return, per caption, the weights (len(caption), L) the model used to generate each of its tokens.

        The caption is fed back one token at a time (teacher forcing on the model's own output), so the
        weights are those of decoding, whatever search produced the caption.
        """
        longest = max((len(c) for c in captions), default=0)
        inputs = np.zeros((len(captions), max(longest, 1)), np.int32)
        inputs[:, 0] = start_id
        for i, caption in enumerate(captions):
            inputs[i, 1 : len(caption)] = caption[:-1]
        state, steps = self.start(features), []
        for t in range(longest):
            _, state, weights = self.step_with_attention(inputs[:, t], state)
            steps.append(weights)
        stacked = np.stack(steps, axis=1) if steps else np.zeros((len(captions), 0, 0), np.float32)
        return [stacked[i, : len(caption)] for i, caption in enumerate(captions)]


def draw_attention_map(
    pixels: np.ndarray, words: list[str], weights: np.ndarray, path: str | Path, columns: int = 5
) -> None:
    """Draw the image, then one panel per word with its attention (H, W) upsampled over the image, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    size = pixels.shape[:2]
    panels = len(words) + 1
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    image = pixels.astype(np.uint8)
    axes.flat[0].imshow(image)
    for axis, word, attention in zip(axes.flat[1:], words, weights, strict=False):
        upsampled = np.asarray(
            Image.fromarray(attention.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BICUBIC)
        )
        axis.imshow(image)
        axis.imshow(upsampled, cmap="gray", alpha=0.6, extent=(0, size[1], size[0], 0))
        axis.set_title(word, fontsize=10)
    figure.suptitle(" ".join(words), fontsize=10)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    plt.close(figure)
    atomic_write_bytes(Path(path), png.getvalue())


register_decoder(
    Decoder(
        "attention",
        build_attention_model,
        AttentionStepper,
        reads_regions=True,
        summary="soft attention over the spatial maps of extract_features.py --spatial",
    )
)
