"""Captioning photos end to end: the run's encoder, then batched beam search with the run's decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.encoders import build_encoder, get_encoder_spec
from features.images import ImageDecodeError, load_image
from models.decoding import Hypothesis, MergeStepper, beam_search
from models.rundir import CaptionRun, RunDirError

ENCODE_BATCH = 32


@dataclass
class Caption:
    image: str
    caption: str
    beams: list[tuple[str, float]]  # (caption, summed log-probability), best first

    def to_dict(self) -> dict:
        return {"image": self.image, "caption": self.caption,
                "beams": [{"caption": c, "log_prob": round(p, 4)} for c, p in self.beams]}


def make_stepper(run: CaptionRun):
    """Return the one-token step function for the run's decoder."""
    steppers = {"merge": MergeStepper}
    decoder = run.model_config.decoder
    if decoder not in steppers:
        raise RunDirError(f"{run.path}: decoder {decoder!r} is not known to this version")
    return steppers[decoder](run.model)


class Captioner:
    """A loaded run plus its encoder; captions images, pixel arrays or precomputed features."""

    def __init__(self, run: CaptionRun, encoder_weights: str | Path | None = None):
        self.run = run
        self.vocabulary = run.vocabulary
        encoder = run.config["encoder"]
        try:
            self.spec = get_encoder_spec(encoder)
        except ValueError as error:
            raise RunDirError(f"{run.path}: {error}") from None
        if self.spec.dim != run.model_config.feature_dim:
            raise RunDirError(
                f"{run.path}: the model expects {run.model_config.feature_dim}-d features but encoder "
                f"{encoder} gives {self.spec.dim}-d"
            )
        self.encoder_weights = encoder_weights or run.config.get("weights", "imagenet")
        self._encoder = None
        self.stepper = make_stepper(run)

    @property
    def encoder(self):
        if self._encoder is None:  # built on first use: captioning from stored features needs none
            self._encoder = build_encoder(self.spec.name, self.encoder_weights)
        return self._encoder

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Return pooled features for (N, S, S, 3) pixel arrays, encoded in fixed-size batches."""
        out = []
        for start in range(0, len(pixels), ENCODE_BATCH):
            chunk = self.spec.preprocess(pixels[start : start + ENCODE_BATCH])
            padded = np.zeros((ENCODE_BATCH, *chunk.shape[1:]), dtype=np.float32)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self.encoder.predict_on_batch(padded))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.spec.dim), np.float32)

    def decode(self, features: np.ndarray, beam: int = 3, max_length: int | None = None,
               length_penalty: float = 0.0) -> list[list[Hypothesis]]:
        """Return the beam hypotheses for each feature vector."""
        max_length = max_length or self.run.model_config.max_caption_length
        return beam_search(self.stepper, features, beam_size=beam, max_length=max_length,
                           length_penalty=length_penalty)

    def caption_features(self, names: list[str], features: np.ndarray, beam: int = 3,
                         max_length: int | None = None, length_penalty: float = 0.0) -> list[Caption]:
        results = []
        for name, hypotheses in zip(names, self.decode(features, beam, max_length, length_penalty)):
            beams = [(" ".join(self.vocabulary.decode(h.tokens)), h.log_prob) for h in hypotheses]
            results.append(Caption(name, beams[0][0], beams))
        return results

    def caption_files(self, paths: list[str | Path], beam: int = 3, max_length: int | None = None,
                      length_penalty: float = 0.0) -> tuple[list[Caption], dict[str, str]]:
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
        features = self.encode(np.stack(pixels))
        return self.caption_features(names, features, beam, max_length, length_penalty), errors
