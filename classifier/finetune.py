"""Fine-tuning the top of an EfficientNet-Lite encoder together with the dense classifier head.

The encoder is split before its last N MBConv blocks (`features.encoders.build_encoder_split`). The
bottom runs once over every image and its activations are cached (`classifier.activations`); the
model trained here reads those activations:

    activations (H, W, C) -> last N blocks + 1x1 head conv (ImageNet weights, BatchNorm frozen)
        -> global average pool -> dense head -> class probabilities

Training has two phases, as in the Keras transfer-learning guide: (1) the dense head alone on the
pooled vectors of the unchanged top (fast: the top runs once), at the head's learning rate; (2)
top and head together at a low learning rate, so the ImageNet weights move only a little. The
BatchNorm layers stay in inference mode: their statistics are ImageNet's and a small batch of
flowers would only make them noisy.
"""

from __future__ import annotations

import keras
from keras import layers

from classifier.model import ClassifierConfig, ClassifierError, build_classifier


def freeze_batch_norm(model: keras.Model) -> None:
    """Set every BatchNormalization layer of `model` (nested ones too) to inference mode, untrained."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
        elif isinstance(layer, keras.Model):
            freeze_batch_norm(layer)


def build_fine_tuned_classifier(config: ClassifierConfig, top: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Return (whole model, dense head): activations -> `top` -> dense head, sharing the head's layers.

    The head alone (pooled vectors -> probabilities) trains in phase 1; the whole model in phase 2.
    """
    if tuple(top.output.shape[1:]) != (config.feature_dim,):
        raise ClassifierError(
            f"the top gives {tuple(top.output.shape[1:])} vectors, the head reads {config.feature_dim}"
        )
    freeze_batch_norm(top)
    head = build_classifier(config)
    inputs = keras.Input(tuple(top.input.shape[1:]), name="activations")
    model = keras.Model(inputs, head(top(inputs)), name="fine_tuned_classifier")
    return model, head
