"""Captioning runtimes: what the Keras and LiteRT captioners share, and which one a command uses.

A runtime loads run directories into a captioner: `keras` (models.captioner.Captioner, the trained
models themselves) or `litert` (models.litert.LiteCaptioner, the `.tflite` files export.py wrote,
needing only numpy, Pillow and ai-edge-litert). Both encode images and decode with the same beam
search (models.search) through their own stepper, so they give the same captions.

Nothing here imports TensorFlow: a runtime's module is imported when that runtime is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.images import ImageDecodeError, load_image
from models.search import DecodingOptions, Hypothesis, beam_search

# runtime name -> "module:class" of its captioner, which has load(paths, encoder_weights)
RUNTIMES = {"keras": "models.captioner:Captioner", "litert": "models.litert:LiteCaptioner"}
AUTO = "auto"  # LiteRT where every run has a current export and nothing asks for Keras, else Keras


@dataclass
class Caption:
    image: str
    caption: str
    beams: list[tuple[str, float]]  # (caption, summed log-probability), best first
    # attention decoders, when asked: the weights over the (H, W) regions for each word of `caption`
    attention: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "caption": self.caption,
            "beams": [{"caption": c, "log_prob": round(p, 4)} for c, p in self.beams],
        }


class CaptionerBase:
    """Captions images, pixel arrays or features with a runtime's encoder and stepper.

    A runtime's captioner sets `name`, `spec` (the encoder: `name`, `input_size`, `spatial_shape`),
    `encoder_weights`, `vocabulary`, `tokens`, `stepper`, `max_caption_length`, `reads_regions`,
    `decoder` (the first run's decoder name) and `device` (where it runs, for reports), and implements
    `encode` (pixels -> features).
    """

    errors: tuple[type[Exception], ...] = ()  # what loading and captioning raise for bad input

    def load_encoder(self) -> None:
        """Load now what would be loaded on first use, so that a bad weights file fails at start-up."""

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features as the decoder reads them: (D,) or the spatial map (H, W, C)."""
        return tuple(self.spec.spatial_shape) if self.reads_regions else (self.spec.dim,)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Return the decoder's features of (N, S, S, 3) pixel arrays in [0, 255]."""
        raise NotImplementedError

    def decode(self, features: np.ndarray, options: DecodingOptions | None = None) -> list[list[Hypothesis]]:
        """Return the beam hypotheses for each image's features (default options: `DecodingOptions()`)."""
        options = (options or DecodingOptions()).with_max_length(self.max_caption_length)
        return beam_search(self.stepper, features, options, self.tokens)

    def caption_features(
        self,
        names: list[str],
        features: np.ndarray,
        options: DecodingOptions | None = None,
        attention: bool = False,
    ) -> list[Caption]:
        """Return the captions of precomputed features; with `attention`, each word's attention weights."""
        if attention:
            self._check_attention()
        decoded = self.decode(features, options)
        results = []
        for name, hypotheses in zip(names, decoded, strict=True):
            beams = [(" ".join(self.vocabulary.decode(h.tokens)), h.log_prob) for h in hypotheses]
            results.append(Caption(name, beams[0][0], beams))
        if attention:
            best = [hypotheses[0].tokens for hypotheses in decoded]
            height, width = self.spec.spatial_shape[:2]
            weights = self.stepper.attention_weights(features, best, self.tokens.start)
            for result, image_weights in zip(results, weights, strict=True):
                words = len(result.caption.split())  # the weights of <end> are left out
                result.attention = image_weights[:words].reshape(words, height, width)
        return results

    def _check_attention(self) -> None:
        """Raise the runtime's error when its stepper cannot give attention weights."""
        raise NotImplementedError

    def caption_files(
        self, paths: list[str | Path], options: DecodingOptions | None = None, attention: bool = False
    ) -> tuple[list[Caption], dict[str, str]]:
        """Return (captions of the readable images, {path: reason} for the unreadable ones)."""
        pixels, names, errors = [], [], {}
        for path in paths:
            try:
                pixels.append(load_image(path, self.spec.input_size))
                names.append(str(path))
            except ImageDecodeError as error:
                errors[str(path)] = str(error)
        if not pixels:
            return [], errors
        return self.caption_features(names, self.encode(np.stack(pixels)), options, attention), errors


def runtime_class(runtime: str) -> type[CaptionerBase]:
    """Return the captioner class of `runtime` (importing its module: TensorFlow for keras)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    module, name = RUNTIMES[runtime].split(":")
    return getattr(importlib.import_module(module), name)


def choose_runtime(
    paths: list[str | Path], requested: str = AUTO, keras_for: str | None = None
) -> tuple[str, str | None]:
    """Return (the runtime to load `paths` with, a warning or None), for `requested` = auto, keras or litert.

    Auto picks litert when ai-edge-litert is installed, every path has an export whose source files are
    unchanged since export.py, and `keras_for` (what needs Keras, e.g. "--attention-map") is None;
    otherwise keras, with a warning when an export exists but is older than its run.
    """
    if requested != AUTO:
        return requested, None
    if keras_for or importlib.util.find_spec("ai_edge_litert") is None:
        return "keras", None
    from models.litert import find_export, stale_sources

    for path in paths:
        folder = find_export(path)
        if folder is None:
            return "keras", None
        changed = stale_sources(folder)
        if changed:
            return "keras", f"{folder} is older than {changed[0]}; captioning with Keras (re-run export.py {path})"
    return "litert", None
