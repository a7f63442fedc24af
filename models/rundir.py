"""Run directories: everything inference needs, saved by training and checked on load.

RUN_DIR/model.keras        best model (no optimizer state)
RUN_DIR/vocabulary.json    the vocabulary
RUN_DIR/config.json        encoder, feature dim, preprocessing, max length, vocabulary size, ...
RUN_DIR/history.csv        per-epoch loss/accuracy; RUN_DIR/curves.png the same as a plot

An ensemble directory holds only a config.json naming member run directories (relative to it),
which decode together (models.decoding.EnsembleStepper):

    {"format": "captioning-ensemble", "version": 1, "members": ["seed0", "seed1"]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras

import models.attention  # noqa: F401  (registers the custom layers for loading)
import models.merge  # noqa: F401
from features.store import atomic_write_bytes, read_versioned_json
from models.config import CaptionModelConfig
from pipeline.vocabulary import Vocabulary, VocabularyError

RUN_FORMAT = "captioning-run"
RUN_FORMAT_VERSION = 1
ENSEMBLE_FORMAT = "captioning-ensemble"
ENSEMBLE_FORMAT_VERSION = 1
MODEL_FILE, VOCABULARY_FILE, CONFIG_FILE, HISTORY_FILE, CURVES_FILE = (
    "model.keras",
    "vocabulary.json",
    "config.json",
    "history.csv",
    "curves.png",
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = PROJECT_ROOT / "pretrained" / "flickr8k_merge_lite0"


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or inconsistent."""


@dataclass
class CaptionRun:
    path: Path
    model: keras.Model
    vocabulary: Vocabulary
    config: dict  # the whole config.json

    @property
    def model_config(self) -> CaptionModelConfig:
        return CaptionModelConfig.from_dict(self.config["model"])


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_run_config(run_dir: Path, config: dict) -> None:
    write_json(run_dir / CONFIG_FILE, {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **config})


def ensemble_members(run_dir: str | Path) -> list[Path] | None:
    """Return the member run directories of an ensemble directory; None for anything else."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or broken: read_run_config words the error
        return None
    if not isinstance(payload, dict) or payload.get("format") != ENSEMBLE_FORMAT:
        return None
    config = read_versioned_json(path, ENSEMBLE_FORMAT, ENSEMBLE_FORMAT_VERSION, "caption-model ensemble", RunDirError)
    members = config.get("members")
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
        raise RunDirError(f"{path}: 'members' must be a non-empty list of run directories")
    return [Path(run_dir) / member for member in members]


def read_run_config(run_dir: str | Path) -> dict:
    """Return config.json of a run directory, checked for format and version."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory (train.py writes one)")
    members = ensemble_members(run_dir)
    if members is not None:
        raise RunDirError(f"{run_dir}: an ensemble of {len(members)} runs; this needs a single run, e.g. {members[0]}")
    try:
        config = read_versioned_json(
            path, RUN_FORMAT, RUN_FORMAT_VERSION, "run config written by train.py", RunDirError
        )
    except FileNotFoundError:
        raise RunDirError(f"{run_dir}: incomplete run directory, {CONFIG_FILE} missing") from None
    for key in ("encoder", "model"):
        if key not in config:
            raise RunDirError(f"{path}: {key!r} missing from the run config")
    return config


def load_run(run_dir: str | Path = DEFAULT_RUN) -> CaptionRun:
    """Return the run's model, vocabulary and config, checking that they agree."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise RunDirError(f"{run_dir}: incomplete run directory, {MODEL_FILE} missing")
    try:
        vocabulary = Vocabulary.load(run_dir / VOCABULARY_FILE)
    except VocabularyError as error:
        raise RunDirError(str(error)) from None
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged archive
        raise RunDirError(f"{model_path}: cannot load the model ({type(error).__name__}: {str(error)[:120]})") from None
    model_config = CaptionModelConfig.from_dict(config["model"])
    if len(vocabulary) != model_config.vocab_size or model.output.shape[-1] != model_config.vocab_size:
        raise RunDirError(
            f"{run_dir}: vocabulary has {len(vocabulary)} words, the model {model.output.shape[-1]}, "
            f"config.json {model_config.vocab_size}"
        )
    return CaptionRun(run_dir, model, vocabulary, config)


def load_runs(run_dir: str | Path = DEFAULT_RUN) -> list[CaptionRun]:
    """Return the members of an ensemble directory, or the one run of a run directory."""
    members = ensemble_members(run_dir) if Path(run_dir).is_dir() else None
    return [load_run(run_dir)] if members is None else [load_run(member) for member in members]


def save_model_without_optimizer(model: keras.Model, path: Path) -> None:
    """Save the model's architecture and weights only (small, loadable anywhere), atomically.

    The copy is rebuilt from the model's config without its compile config: `clone_model` of a
    compiled model compiles the clone too on newer Keras (3.15), and its Adam slots would triple the file.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    clone.save(temporary)
    temporary.replace(path)
