"""The encoder registry: which CNN turns an image into a pooled vector and a spatial map.

Each `EncoderSpec` records its input size, preprocessing, pooled-vector layer and dimension, and
spatial-map layer and shape; `build_encoder` returns a Keras model with those outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from features.efficientnet_lite import (
    VARIANTS,
    block_input_layer,
    block_layout,
    build_efficientnet_lite,
    build_efficientnet_lite_top,
    imagenet_weights_file,
)


class EncoderError(ValueError):
    """An unknown encoder or weights that cannot be loaded."""


def _lite_preprocess(pixels: np.ndarray) -> np.ndarray:
    return (pixels - 127.0) / 128.0


def _vgg16_preprocess(pixels: np.ndarray) -> np.ndarray:
    return keras.applications.vgg16.preprocess_input(np.array(pixels, dtype=np.float32))


def _resnet50_preprocess(pixels: np.ndarray) -> np.ndarray:
    return keras.applications.resnet50.preprocess_input(np.array(pixels, dtype=np.float32))


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int
    preprocessing: str
    pooled_layer: str
    dim: int
    spatial_layer: str
    spatial_shape: tuple[int, int, int]
    preprocess: Callable[[np.ndarray], np.ndarray]

    @property
    def pools_spatial_map(self) -> bool:
        """Whether the pooled vector is the mean of the spatial map over its positions."""
        return self.pooled_layer == "avg_pool"

    def metadata(self) -> dict:
        """Return the JSON-able description recorded in feature stores and run directories."""
        return {
            "encoder": self.name,
            "image_size": self.input_size,
            "preprocessing": self.preprocessing,
            "pooled_layer": self.pooled_layer,
            "dim": self.dim,
            "spatial_layer": self.spatial_layer,
            "spatial_shape": list(self.spatial_shape),
        }


def _lite_spec(name: str) -> EncoderSpec:
    size = VARIANTS[name].image_size
    side = -(-size // 32)  # five stride-2 stages with "same" padding
    return EncoderSpec(
        name, size, "(x - 127) / 128", "avg_pool", 1280, "head_relu", (side, side, 1280), _lite_preprocess
    )


ENCODERS: dict[str, EncoderSpec] = {
    **{name: _lite_spec(name) for name in VARIANTS},
    "vgg16": EncoderSpec(
        "vgg16",
        224,
        "keras.applications.vgg16.preprocess_input",
        "fc2",
        4096,
        "block5_conv3",
        (14, 14, 512),
        _vgg16_preprocess,
    ),
    "resnet50": EncoderSpec(
        "resnet50",
        224,
        "keras.applications.resnet50.preprocess_input",
        "avg_pool",
        2048,
        "conv5_block3_out",
        (7, 7, 2048),
        _resnet50_preprocess,
    ),
}
DEFAULT_ENCODER = "efficientnet_lite0"


def get_encoder_spec(name: str) -> EncoderSpec:
    """Return the registry entry for `name`, or raise `EncoderError` listing the known encoders."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}") from None


def _keras_application(name: str, weights: str | None) -> keras.Model:
    constructor = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50}[name]
    try:
        return constructor(include_top=True, weights=weights)
    except Exception as error:  # Keras raises a bare Exception for a failed download
        if weights != "imagenet":
            raise
        raise EncoderError(
            f"could not download the {name} ImageNet weights ({type(error).__name__}: {str(error)[:120]}); "
            f"offline, download the Keras weights file elsewhere and pass it with --weights PATH.h5"
        ) from None


def local_weights_file(weights: str | Path | None) -> Path | None:
    """Return the local weights file that `weights` names (None for "imagenet" or no weights); raise
    `EncoderError` if it is not there."""
    if weights in (None, "none", "imagenet"):
        return None
    if not Path(weights).is_file():
        raise EncoderError(f"weights file {weights} does not exist")
    return Path(weights)


def build_encoder(name: str, weights: str | Path | None = "imagenet", spatial: bool = False) -> keras.Model:
    """Return a Keras model mapping preprocessed images to the pooled vector (and the spatial map).

    `weights`: "imagenet" (Keras download for vgg16/resnet50, converted package weights for
    efficientnet_lite0), a path to a local Keras weights file, or None / "none" for random weights.
    """
    spec = get_encoder_spec(name)
    if weights in (None, "none"):
        weights = None
    local = local_weights_file(weights)
    if name in VARIANTS:
        backbone = build_efficientnet_lite(VARIANTS[name], include_top=True)
        if weights == "imagenet":
            try:
                local = imagenet_weights_file(VARIANTS[name])
            except FileNotFoundError as error:
                raise EncoderError(str(error)) from None
    else:
        backbone = _keras_application(name, "imagenet" if weights == "imagenet" else None)
    if local is not None:
        try:
            backbone.load_weights(local)
        except Exception as error:  # h5py/Keras raise many kinds for a mismatched file
            raise EncoderError(f"weights file {local} does not fit {name}: {str(error)[:160]}") from None
    outputs = [backbone.get_layer(spec.pooled_layer).output]
    if spatial:
        outputs.append(backbone.get_layer(spec.spatial_layer).output)
    return keras.Model(backbone.input, outputs, name=f"{name}_encoder")


def split_point(name: str, fine_tune_blocks: int) -> int:
    """Return the index of the first block of the top when the last `fine_tune_blocks` blocks are tuned."""
    if name not in VARIANTS:
        raise EncoderError(f"only the EfficientNet-Lite encoders can be split for fine-tuning, not {name!r}")
    count = len(block_layout(VARIANTS[name]))
    if not 1 <= fine_tune_blocks < count:
        raise EncoderError(f"{name} has {count} blocks: fine-tune between 1 and {count - 1} of them")
    return count - fine_tune_blocks


def build_encoder_split(
    name: str, weights: str | Path | None = "imagenet", fine_tune_blocks: int = 1
) -> tuple[keras.Model, keras.Model]:
    """Return (bottom, top): preprocessed images -> block activations, and activations -> pooled vector.

    The top holds the last `fine_tune_blocks` MBConv blocks and the 1x1 head conv, with the encoder's
    weights; top(bottom(x)) is the encoder's pooled vector.
    """
    first_block = split_point(name, fine_tune_blocks)
    encoder = build_encoder(name, weights)
    bottom = keras.Model(
        encoder.input, encoder.get_layer(block_input_layer(VARIANTS[name], first_block)).input, name=f"{name}_bottom"
    )
    top = build_efficientnet_lite_top(VARIANTS[name], first_block)
    for layer in top.layers:
        if layer.weights:
            layer.set_weights(encoder.get_layer(layer.name).get_weights())
    return bottom, top
