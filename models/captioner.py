"""Captioning photos end to end with Keras: the run's encoder, then batched beam search with the run's decoder.

What every runtime shares (beam search over a stepper, `caption_features`, `caption_files`, `Caption`)
is `models.runtimes.CaptionerBase`; the LiteRT runtime is `models.litert.LiteCaptioner`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from features.encoders import EncoderError, build_encoder, get_encoder_spec
from models.decoders import get_decoder
from models.decoding import EnsembleStepper, PooledStepper
from models.rundir import CaptionRun, RunDirError, load_runs
from models.runtimes import Caption, CaptionerBase
from models.search import SpecialTokens

ENCODE_BATCH = 32
__all__ = ["Caption", "Captioner", "make_stepper"]


def make_stepper(run: CaptionRun):
    """Return the one-token step function for the run's decoder."""
    return get_decoder(run.model_config.decoder).stepper(run.model)


class Captioner(CaptionerBase):
    """A loaded run (or an ensemble of runs) plus its encoder; captions images, pixel arrays or features.

    An ensemble's members must share the vocabulary, the encoder and its weights; they decode as one
    model whose next-word distribution is the mean of theirs (`EnsembleStepper`).
    """

    errors = (RunDirError, EncoderError)  # what loading and captioning raise for bad input: one line in the CLIs

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
        self.steppers = [  # one per member; export.py writes each as a LiteRT decoder
            PooledStepper(make_stepper(member))
            if self.reads_regions and not member.model_config.reads_regions
            else make_stepper(member)
            for member in self.runs
        ]
        self.stepper = self.steppers[0] if len(self.steppers) == 1 else EnsembleStepper(self.steppers)
        self.decoder = run.model_config.decoder
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
    def device(self) -> str:
        """Where the models run, for reports."""
        from models.training import describe_device

        return f"Keras on {describe_device()}"

    @property
    def encoder(self):
        if self._encoder is None:  # built on first use: captioning from stored features needs none
            self._encoder = build_encoder(self.spec.name, self.encoder_weights, spatial=self.reads_regions)
        return self._encoder

    def load_encoder(self) -> None:
        self.encoder  # noqa: B018  (the property builds it)

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
