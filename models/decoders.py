"""The decoder registry: each caption decoder registers its name, builder and stepper in its own module.

Adding a decoder is one new module in `models/` that builds a Keras model from a `CaptionModelConfig`,
defines its stepper (a `models.decoding.Stepper` subclass), and calls `register_decoder(...)` at import:
on first use the registry imports every module of `models/` whose source calls `register_decoder(`.
Code elsewhere (a test, a plug-in) may register a decoder too, by calling `register_decoder` itself. The model
must follow the contract the steppers and training rely on: inputs `words` (B, T) int32 and `image`
(B, D) (or `regions` (B, H, W, C) when it reads spatial maps), and layers named `embedding` (the word
vectors), `hidden` and `next_word` (the last two layers: next-word probabilities (B, T, V)).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MODELS_FOLDER = Path(__file__).resolve().parent
REQUIRED_LAYERS = ("embedding", "hidden", "next_word")


class DecoderError(ValueError):
    """An unknown decoder, or a model that breaks the decoder contract."""


@dataclass(frozen=True)
class Decoder:
    name: str
    build: Callable  # CaptionModelConfig -> keras.Model
    stepper: Callable  # keras.Model -> Stepper
    reads_regions: bool = False  # reads spatial maps (H, W, C) instead of one pooled vector per image
    summary: str = ""  # one line for train.py --help

    @property
    def input_name(self) -> str:
        """The model input that carries the image: "regions" (spatial maps) or "image" (pooled vectors)."""
        return "regions" if self.reads_regions else "image"


_REGISTRY: dict[str, Decoder] = {}
_discovered = False


def register_decoder(decoder: Decoder) -> Decoder:
    """Add `decoder` to the registry (a module registers its decoder once, at import) and return it."""
    _REGISTRY[decoder.name] = decoder
    return decoder


def _load_built_in() -> None:
    """Import, once, each module of models/ that registers a decoder (merge, inject, attention, ...)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for path in sorted(MODELS_FOLDER.glob("*.py")):
        if path.stem != "decoders" and "register_decoder(" in path.read_text(encoding="utf-8"):
            importlib.import_module(f"models.{path.stem}")


def decoder_names() -> list[str]:
    """Return the registered decoders' names (train.py --decoder's choices)."""
    _load_built_in()
    return list(_REGISTRY)


def get_decoder(name: str) -> Decoder:
    """Return the registered decoder called `name`."""
    _load_built_in()
    if name not in _REGISTRY:
        raise DecoderError(f"unknown decoder {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_decoder_model(config):
    """Return the Keras model of `config.decoder`, checked against the decoder contract."""
    decoder = get_decoder(config.decoder)
    model = decoder.build(config)
    present = {layer.name for layer in model.layers}
    missing = [name for name in REQUIRED_LAYERS if name not in present]
    inputs = model.input if isinstance(model.input, dict) else {}
    if missing or decoder.input_name not in inputs or "words" not in inputs:
        raise DecoderError(
            f"decoder {decoder.name!r}: its model needs inputs 'words' and {decoder.input_name!r} and layers "
            f"{', '.join(REQUIRED_LAYERS)} (missing: {', '.join(missing) or 'an input'})"
        )
    return model


def decoder_help() -> str:
    """Return one line per registered decoder, for --help."""
    return "; ".join(f"{d.name}: {d.summary}" if d.summary else d.name for d in map(get_decoder, decoder_names()))
