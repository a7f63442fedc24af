"""The LiteRT runtime: captions with what export.py wrote, needing only numpy, Pillow and ai-edge-litert.

EXPORT/export.json           format captioning-litert-export: the encoder, the decoders, each file's
                             SHA-256, the source files it was made from (to notice a retrained run)
EXPORT/encoder.tflite        signature "encode": pixels (B, S, S, 3) in [0, 255] -> features (B, D) or
                             maps (B, H, W, C); the encoder's preprocessing is inside the graph
EXPORT/decoder_NAME.tflite   one per run (an ensemble has several): signature "start": features ->
                             state_0..n; "step": tokens (B,) int32, state_0..n -> log_probs (B, V), state_0..n
EXPORT/vocabulary.json       the runs' vocabulary

export.py writes RUN_DIR/litert/ by default, and that is where `find_export` looks. The beam search
is models.search's, shared with the Keras runtime: `LiteStepper` is one more stepper, and an
ensemble's distribution is the mean of its members' probabilities, as in models.decoding.
Nothing here imports TensorFlow or Keras (tests/test_litert.py runs it where they cannot be imported).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.store import read_versioned_json
from models.runtimes import CaptionerBase
from models.search import SpecialTokens
from pipeline.vocabulary import Vocabulary, VocabularyError

EXPORT_FORMAT = "captioning-litert-export"
EXPORT_VERSION = 1
EXPORT_FOLDER = "litert"  # RUN_DIR/litert: where export.py writes by default and find_export looks
EXPORT_FILE, ENCODER_FILE, VOCABULARY_FILE = "export.json", "encoder.tflite", "vocabulary.json"
ENCODE_BATCH = 32  # images per encoder call, as the Keras runtime


class ExportError(ValueError):
    """A LiteRT export that is missing, incomplete, corrupt or unusable here."""


def find_export(path: str | Path) -> Path | None:
    """Return the export folder of a run or ensemble directory (or `path` itself, if it is one); None if none."""
    path = Path(path)
    for folder in (path / EXPORT_FOLDER, path):
        if (folder / EXPORT_FILE).is_file():
            return folder
    return None


def read_export(folder: str | Path) -> dict:
    """Return the export.json of an export folder, checked for format and version."""
    path = Path(folder) / EXPORT_FILE
    try:
        return read_versioned_json(
            path, EXPORT_FORMAT, EXPORT_VERSION, "LiteRT export written by export.py", ExportError
        )
    except FileNotFoundError:
        raise ExportError(f"{folder}: no LiteRT export ({EXPORT_FILE} missing); run python export.py RUN_DIR") from None


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_sources(folder: str | Path) -> list[str]:
    """Return the source files (model.keras, vocabulary.json) changed since the export; those absent are not checked."""
    sources = read_export(folder).get("sources")
    if not isinstance(sources, dict):
        return []
    changed = []
    for relative, digest in sources.items():
        path = Path(folder) / relative
        if path.is_file() and sha256_of(path) != digest:
            changed.append(os.path.normpath(path))
    return changed


def load_interpreter(path: Path, sha256: str | None, threads: int | None):
    """Return a LiteRT interpreter of a .tflite file, checked against its recorded SHA-256 first."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ExportError("the LiteRT runtime needs ai-edge-litert: pip install -r requirements-lite.txt") from None
    if not path.is_file():
        raise ExportError(f"{path}: missing from the export; re-run python export.py")
    if sha256 is not None and sha256_of(path) != sha256:
        raise ExportError(f"{path}: its bytes do not match export.json (corrupt or partly copied); re-run export.py")
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()  # applies the XNNPACK delegate now (it logs a line), not on the first image
        return interpreter
    except (ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:160]
        raise ExportError(f"{path}: not a LiteRT model LiteRT can load ({reason}); re-run export.py") from None


def signature(interpreter, name: str, path: Path):
    """Return the interpreter's runner for signature `name`."""
    try:
        return interpreter.get_signature_runner(name)
    except ValueError:
        found = ", ".join(interpreter.get_signature_list()) or "none"
        raise ExportError(f"{path}: no '{name}' signature (it has {found}); re-run export.py") from None


class LiteDecoder:
    """One run's decoder: `start(features) -> state` and `step(tokens, state) -> (log_probs, state)`, in numpy."""

    def __init__(self, path: Path, sha256: str | None, threads: int | None):
        interpreter = load_interpreter(path, sha256, threads)
        self.path = path
        self._start = signature(interpreter, "start", path)
        self._step = signature(interpreter, "step", path)
        self.state_size = len(interpreter.get_signature_list()["start"]["outputs"])

    def start(self, features: np.ndarray) -> list[np.ndarray]:
        outputs = self._start(features=np.ascontiguousarray(features, dtype=np.float32))
        return [outputs[f"state_{i}"] for i in range(self.state_size)]

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        inputs = {f"state_{i}": part for i, part in enumerate(state)}
        outputs = self._step(tokens=np.asarray(tokens, dtype=np.int32), **inputs)
        return outputs["log_probs"], [outputs[f"state_{i}"] for i in range(self.state_size)]


class LiteStepper:
    """The stepper of models.search over one or several LiteRT decoders (an ensemble).

    The state is the members' states, concatenated; the next-word distribution of an ensemble is the
    mean of the members' probabilities (log of the mean), as `models.decoding.EnsembleStepper`.
    """

    def __init__(self, decoders: list[LiteDecoder]):
        if not decoders:
            raise ExportError("an export needs at least one decoder")
        self.decoders = decoders

    def start(self, features: np.ndarray) -> list[np.ndarray]:
        return [part for decoder in self.decoders for part in decoder.start(features)]

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        log_probs, new_state, at = [], [], 0
        for decoder in self.decoders:
            member_log_probs, member_state = decoder.step(tokens, state[at : at + decoder.state_size])
            log_probs.append(member_log_probs)
            new_state += member_state
            at += decoder.state_size
        if len(log_probs) == 1:
            return log_probs[0], new_state
        stacked = np.stack(log_probs)
        top = stacked.max(axis=0)
        mean = top + np.log(np.exp(stacked - top).sum(axis=0)) - np.log(np.float32(len(log_probs)))
        return mean.astype(np.float32), new_state

    def reorder(self, state: list[np.ndarray], indices: np.ndarray) -> list[np.ndarray]:
        return [part[indices] for part in state]


@dataclass(frozen=True)
class ExportedEncoder:
    """The encoder of an export: the parts of `features.encoders.EncoderSpec` a captioner reads."""

    name: str
    input_size: int
    dim: int
    spatial_shape: tuple[int, int, int]
    preprocessing: str

    @classmethod
    def of(cls, section: dict) -> ExportedEncoder:
        return cls(
            section["name"],
            int(section["input_size"]),
            int(section["dim"]),
            tuple(section["spatial_shape"]),
            section["preprocessing"],
        )


@dataclass
class ExportPart:
    """One export folder, read: its config, vocabulary and decoders' files."""

    folder: Path
    config: dict
    vocabulary: Vocabulary

    @classmethod
    def read(cls, path: str | Path) -> ExportPart:
        folder = find_export(path)
        if folder is None:
            raise ExportError(
                f"{path}: no LiteRT export ({EXPORT_FOLDER}/{EXPORT_FILE}); run python export.py {path}, "
                "or caption with --runtime keras"
            )
        config = read_export(folder)
        try:  # every key the captioner reads, checked now so that a malformed file is one clear error
            vocabulary = Vocabulary.load(folder / config.get("vocabulary", VOCABULARY_FILE))
            ExportedEncoder.of(config["encoder"])
            if not config["decoders"] or not all(d["file"] and d["decoder"] for d in config["decoders"]):
                raise ValueError("'decoders' must list each decoder's file and kind")
            int(config["max_caption_length"])
        except VocabularyError as error:
            raise ExportError(str(error)) from None
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(f"{folder / EXPORT_FILE}: malformed export ({type(error).__name__}: {error})") from None
        return cls(folder, config, vocabulary)

    def features_made_by(self) -> str:
        """Return what makes this export's features: the encoder, its weights, vectors or maps."""
        encoder = self.config["encoder"]
        kind = "spatial maps" if self.config.get("reads_regions") else "vectors"
        return f"{encoder['name']} {kind}, weights {encoder.get('weights')}"

    def decoders(self, threads: int | None) -> list[LiteDecoder]:
        return [LiteDecoder(self.folder / d["file"], d.get("sha256"), threads) for d in self.config["decoders"]]


class LiteCaptioner(CaptionerBase):
    """One export, or several decoded as an ensemble, with the first one's encoder.

    Several exports must share the vocabulary, the encoder and its weights, and the kind of features
    (vectors or spatial maps); an ensemble directory exported as one has all of that by construction.
    """

    errors = (ExportError,)  # what loading and captioning raise for bad input: one line in the CLIs

    def __init__(self, parts: list[ExportPart], name: str | None = None, threads: int | None = None):
        if not parts:
            raise ExportError("no LiteRT export to load")
        first = parts[0]
        encoder = first.config["encoder"]
        self.spec = ExportedEncoder.of(encoder)
        self.encoder_weights = encoder.get("weights", "imagenet")
        self.reads_regions = bool(first.config.get("reads_regions", False))
        for part in parts[1:]:
            self._check_part(first, part)
        self.vocabulary = first.vocabulary
        self.tokens = SpecialTokens.of(self.vocabulary)
        self.decoder = first.config["decoders"][0]["decoder"]
        self.max_caption_length = max(int(part.config["max_caption_length"]) for part in parts)
        path = first.folder / encoder.get("file", ENCODER_FILE)
        self._encode = signature(load_interpreter(path, encoder.get("sha256"), threads), "encode", path)
        self.stepper = LiteStepper([decoder for part in parts for decoder in part.decoders(threads)])
        self.name = name or " + ".join(str(part.folder) for part in parts)
        self.device = "LiteRT on CPU"

    @classmethod
    def load(
        cls, paths: str | Path | list[str | Path], encoder_weights: str | None = None, threads: int | None = None
    ) -> LiteCaptioner:
        """Return the captioner of the exports of run or ensemble directories (or export folders)."""
        if encoder_weights:
            raise ExportError(
                "an export has its encoder's weights built in; to override them (--encoder-weights), use --runtime keras"
            )
        paths = [paths] if isinstance(paths, str | Path) else list(paths)
        return cls([ExportPart.read(path) for path in paths], " + ".join(str(path) for path in paths), threads)

    @staticmethod
    def _check_part(first: ExportPart, part: ExportPart) -> None:
        if part.features_made_by() != first.features_made_by():
            raise ExportError(
                f"{part.folder}: its features ({part.features_made_by()}) differ from {first.folder}'s "
                f"({first.features_made_by()}); to decode runs together, export them as one ensemble directory"
            )
        if part.vocabulary.words != first.vocabulary.words:
            raise ExportError(f"{part.folder}: its vocabulary differs from {first.folder}'s; an ensemble shares one")

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Return the decoders' features of (N, S, S, 3) pixel arrays in [0, 255], ENCODE_BATCH at a time."""
        out = []
        for start in range(0, len(pixels), ENCODE_BATCH):
            chunk = np.ascontiguousarray(pixels[start : start + ENCODE_BATCH], dtype=np.float32)
            features = self._encode(pixels=chunk)["features"]
            # Round the maps through float16 as the store and the Keras runtime do.
            out.append(features.astype(np.float16).astype(np.float32) if self.reads_regions else features)
        return np.concatenate(out) if out else np.zeros((0, *self.feature_shape), np.float32)

    def _check_attention(self) -> None:
        raise ExportError("attention maps need the Keras runtime: add --runtime keras")
