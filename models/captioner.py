"""Captioning photos end to end: the run's encoder, then batched beam search with the run's decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.encoders import build_encoder, get_encoder_spec
from features.images import ImageDecodeError, load_image
from models.decoders import get_decoder
from models.decoding import EnsembleStepper, PooledStepper
from models.rundir import CaptionRun, RunDirError, load_runs
from models.search import DecodingOptions, Hypothesis, SpecialTokens, beam_search

ENCODE_BATCH = 32


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


def make_stepper(run: CaptionRun):
    """Return the one-token step function for the run's decoder."""
    return get_decoder(run.model_config.decoder).stepper(run.model)


class Captioner:
    """A loaded run (or an ensemble of runs) plus its encoder; captions images, pixel arrays or features.

    An ensemble's members must share the vocabulary, the encoder and its weights; they decode as one
    model whose next-word distribution is the mean of theirs (`EnsembleStepper`).
    """

    def __init__(
        self,
        runs: CaptionRun | list[CaptionRun],
        encoder_weights: str | Path | None = None,
        name: str | None = None,
    ):
        self.runs = [runs] if isinstance(runs, CaptionRun) else list(runs)
        if not self.runs:
            raise RunDirError("no caption run to load")
        run = self.run = self.runs[0]
        self.vocabulary = run.vocabulary
        self.tokens = SpecialTokens.of(run.vocabulary)
        encoder = run.config["encoder"]
        try:
            self.spec = get_encoder_spec(encoder)
        except ValueError as error:
            raise RunDirError(f"{run.path}: {error}") from None
        # The features are spatial maps if any member reads them; vector members then pool the maps.
        self.reads_regions = any(member.model_config.reads_regions for member in self.runs)
        for member in self.runs:
            self._check_member(member)
        self.encoder_weights = encoder_weights or run.config.get("weights", "imagenet")
        self._encoder = None
        steppers = [
            PooledStepper(make_stepper(member))
            if self.reads_regions and not member.model_config.reads_regions
            else make_stepper(member)
            for member in self.runs
        ]
        self.stepper = steppers[0] if len(steppers) == 1 else EnsembleStepper(steppers)
        self.max_caption_length = max(member.model_config.max_caption_length for member in self.runs)
        # what was loaded, for reports: the paths asked for (an ensemble directory is one name)
        self.name = name or " + ".join(str(member.path) for member in self.runs)

    @classmethod
    def load(cls, paths: str | Path | list[str | Path], encoder_weights: str | Path | None = None) -> Captioner:
        """Return the captioner of a run directory, an ensemble directory, or several of them together."""
        paths = [paths] if isinstance(paths, str | Path) else list(paths)
        runs = [run for path in paths for run in load_runs(path)]
        return cls(runs, encoder_weights, name=" + ".join(str(path) for path in paths))

    def _check_member(self, member: CaptionRun) -> None:
        first, config = self.run, member.model_config
        if member.config["encoder"] != first.config["encoder"] or member.config.get("weights") != first.config.get(
            "weights"
        ):
            raise RunDirError(
                f"{member.path}: encoder {member.config['encoder']} ({member.config.get('weights')}), but "
                f"{first.path} uses {first.config['encoder']} ({first.config.get('weights')}); an ensemble shares one"
            )
        if member.vocabulary.words != first.vocabulary.words:
            raise RunDirError(f"{member.path}: its vocabulary differs from {first.path}'s; an ensemble shares one")
        if self.spec.dim != config.feature_dim:
            raise RunDirError(
                f"{member.path}: the model expects {config.feature_dim}-d features but encoder "
                f"{self.spec.name} gives {self.spec.dim}-d"
            )
        if self.reads_regions and not config.reads_regions and not self.spec.pools_spatial_map:
            raise RunDirError(
                f"{member.path}: encoder {self.spec.name}'s vector ({self.spec.pooled_layer}) is not the mean of "
                f"its spatial map, so this {config.decoder} decoder cannot join an ensemble with attention decoders"
            )
        if config.reads_regions and tuple(self.spec.spatial_shape) != config.spatial_shape:
            raise RunDirError(
                f"{member.path}: the model expects {config.spatial_shape} spatial maps but encoder "
                f"{self.spec.name} gives {tuple(self.spec.spatial_shape)}"
            )

    @property
    def description(self) -> dict:
        """The run's config, or for an ensemble the members' paths and configs (for reports)."""
        if len(self.runs) == 1:
            return self.run.config
        return {"ensemble": [{"path": str(member.path), **member.config} for member in self.runs]}

    @property
    def encoder(self):
        if self._encoder is None:  # built on first use: captioning from stored features needs none
            self._encoder = build_encoder(self.spec.name, self.encoder_weights, spatial=self.reads_regions)
        return self._encoder

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features as the decoder reads them: (D,) or the spatial map (H, W, C)."""
        return tuple(self.spec.spatial_shape) if self.reads_regions else (self.spec.dim,)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Return the decoder's features for (N, S, S, 3) pixel arrays, encoded in fixed-size batches:
        pooled vectors, or spatial maps for an attention decoder."""
        out = []
        for start in range(0, len(pixels), ENCODE_BATCH):
            chunk = self.spec.preprocess(pixels[start : start + ENCODE_BATCH])
            padded = np.zeros((ENCODE_BATCH, *chunk.shape[1:]), dtype=np.float32)
            padded[: len(chunk)] = chunk
            outputs = self.encoder.predict_on_batch(padded)
            # Round the maps through float16 as the store does, so stored and fresh features agree.
            features = np.asarray(outputs[1], np.float16).astype(np.float32) if self.reads_regions else outputs
            out.append(np.asarray(features)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, *self.feature_shape), np.float32)

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
        if not hasattr(self.stepper, "attention_weights"):
            what = (
                f"the {self.run.model_config.decoder} decoder has"
                if len(self.runs) == 1
                else f"an ensemble of {len(self.runs)} runs has"
            )
            raise RunDirError(
                f"{self.run.path}: {what} no attention weights to show; use a single run trained with --decoder attention"
            )

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
