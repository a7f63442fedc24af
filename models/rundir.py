"""Run directories: everything inference needs, saved by training and checked on load.

RUN_DIR/model.keras        best model (no optimizer state)
RUN_DIR/vocabulary.json    the vocabulary
RUN_DIR/config.json        the encoder that made the features, the model config, how it was trained
RUN_DIR/history.csv        per-epoch figures; RUN_DIR/curves.png the same as a plot
RUN_DIR/last_epoch.keras   + last_epoch.json: the whole model with its optimizer after the last
                           finished epoch, for --resume
RUN_DIR/.backup/           a distributed run's BackupAndRestore state while it trains: the same command,
                           run again after a failure, continues from it

`config.json` holds each fact once: the encoder's name, image size, preprocessing and weights at the
top, and the model's hyper-parameters (feature size, vocabulary size, longest caption) under "model".
Version 1 runs (which repeated those sizes at the top) still load; their copies are ignored.

An ensemble directory holds only a config.json naming member run directories (relative to it),
which decode together (models.decoding.EnsembleStepper):

    {"format": "captioning-ensemble", "version": 1, "members": ["seed0", "seed1"]}
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from features.store import atomic_write_bytes, read_versioned_json
from models.config import CaptionModelConfig
from models.decoders import DecoderError, get_decoder
from pipeline.vocabulary import Vocabulary, VocabularyError

if TYPE_CHECKING:  # Keras is imported where a model is loaded or saved: the LiteRT runtime reads DEFAULT_RUN
    import keras

RUN_FORMAT = "captioning-run"
RUN_FORMAT_VERSION = 2
READABLE_RUN_VERSIONS = (1, 2)
# Version 1 wrote these beside "model", which holds the same facts; they are dropped when a run is rewritten.
VERSION_1_COPIES = ("dim", "feature_dim", "max_caption_length", "vocab_size", "min_count")
ENSEMBLE_FORMAT = "captioning-ensemble"
ENSEMBLE_FORMAT_VERSION = 1
MODEL_FILE, VOCABULARY_FILE, CONFIG_FILE, HISTORY_FILE, CURVES_FILE = (
    "model.keras",
    "vocabulary.json",
    "config.json",
    "history.csv",
    "curves.png",
)
CHECKPOINT_FILE, STATE_FILE = "last_epoch.keras", "last_epoch.json"
BACKUP_DIR = ".backup"  # a distributed run's keras.callbacks.BackupAndRestore folder, gone when training ends
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = PROJECT_ROOT / "pretrained" / "flickr8k_attention_lite0"  # the shipped model (issue 22); BENCHMARKS.md


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or inconsistent."""


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@dataclass
class CaptionRun:
    path: Path
    model: keras.Model
    vocabulary: Vocabulary
    config: dict  # the whole config.json

    @property
    def model_config(self) -> CaptionModelConfig:
        return CaptionModelConfig.from_dict(self.config["model"])


class RunDir:
    """A caption run's folder: its paths, config.json, history CSV, checkpoints and resume state.

    Every file is written atomically (a temporary file in the same folder, then `os.replace`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # --- config.json -----------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        """Write config.json (format and version added; version-1 copies of model facts dropped)."""
        kept = {k: v for k, v in config.items() if k not in (*VERSION_1_COPIES, "format", "version")}
        write_json(self.file(CONFIG_FILE), {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **kept})

    def read_config(self) -> dict:
        """Return config.json, checked for format, version and shape."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run directory (train.py writes one)")
        members = ensemble_members(self.path)
        if members is not None:
            raise RunDirError(
                f"{self.path}: an ensemble of {len(members)} runs; this needs a single run, e.g. {members[0]}"
            )
        path = self.file(CONFIG_FILE)
        try:
            config = read_versioned_json(
                path, RUN_FORMAT, READABLE_RUN_VERSIONS, "run config written by train.py", RunDirError
            )
        except FileNotFoundError:
            raise RunDirError(f"{self.path}: incomplete run directory, {CONFIG_FILE} missing") from None
        if not isinstance(config.get("encoder"), str):
            raise RunDirError(f"{path}: 'encoder' must name the encoder (e.g. \"efficientnet_lite0\")")
        model_config(config, path)  # checks "model" now, so a malformed one is one clear error
        return config

    # --- history ---------------------------------------------------------------------------------
    def read_history(self, name: str = HISTORY_FILE) -> list[dict]:
        """Return the rows of a history CSV (empty when there is none yet)."""
        path = self.file(name)
        if not path.is_file():
            return []
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def write_history(self, rows: list[dict], name: str = HISTORY_FILE) -> None:
        """Replace a history CSV by `rows` (removed when there are none)."""
        if not rows:
            self.file(name).unlink(missing_ok=True)
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.file(name), buffer.getvalue().encode())

    # --- models and resume state -----------------------------------------------------------------
    def save_model(self, model: keras.Model, name: str = MODEL_FILE) -> None:
        """Save the model's architecture and weights only (small, loadable anywhere), atomically."""
        save_model_without_optimizer(model, self.file(name))

    def save_checkpoint(self, model: keras.Model, epochs_done: int) -> None:
        """Save the whole model with its optimizer state, then the number of finished epochs."""
        temporary = self.file(f".{CHECKPOINT_FILE}.tmp.keras")
        model.save(temporary)
        temporary.replace(self.file(CHECKPOINT_FILE))
        write_json(self.file(STATE_FILE), {"epochs_done": epochs_done})

    def epochs_done(self) -> int:
        """Return the epochs the last checkpoint holds."""
        try:
            return int(json.loads(self.file(STATE_FILE).read_text())["epochs_done"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunDirError(f"{self.file(STATE_FILE)}: unreadable resume state ({error})") from None

    def load_checkpoint(self) -> keras.Model:
        """Return the model of the last checkpoint, with its optimizer state."""
        import keras

        return keras.saving.load_model(self.file(CHECKPOINT_FILE))

    def backup_epoch(self) -> int | None:
        """Return the epoch a distributed run's backup restarts from, or None when there is no backup."""
        path = self.file(BACKUP_DIR) / "training_metadata.json"
        if not path.is_file():
            return None
        try:
            return int(json.loads(path.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunDirError(
                f"{path}: unreadable backup state ({error}); delete {path.parent} to start over"
            ) from None

    def check_start(self, resume: bool, distributed: bool = False) -> None:
        """Refuse a resume without an interrupted run, and a fresh start over one (unless `distributed`
        and the run has a backup: the same command then continues from it)."""
        interrupted = self.file(STATE_FILE).is_file() and not (distributed and self.backup_epoch() is not None)
        if resume and not self.file(STATE_FILE).is_file():
            raise RunDirError(f"{self.path}: nothing to resume (no {STATE_FILE}); start without --resume")
        if not resume and interrupted:
            raise RunDirError(
                f"{self.path} already holds a training run; pass --resume to continue it or choose another --out"
            )

    def copy_vocabulary_from(self, other: RunDir) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(other.file(VOCABULARY_FILE), self.file(VOCABULARY_FILE))

    # --- loading -----------------------------------------------------------------------------------
    def load(self) -> CaptionRun:
        """Return the run's model, vocabulary and config, checking that they agree."""
        import keras

        config = self.read_config()
        model_path = self.file(MODEL_FILE)
        if not model_path.is_file():
            raise RunDirError(f"{self.path}: incomplete run directory, {MODEL_FILE} missing")
        try:
            vocabulary = Vocabulary.load(self.file(VOCABULARY_FILE))
        except VocabularyError as error:
            raise RunDirError(str(error)) from None
        try:
            model = keras.saving.load_model(model_path, compile=False)
        except Exception as error:  # Keras raises many kinds for a damaged archive
            raise RunDirError(
                f"{model_path}: cannot load the model ({type(error).__name__}: {str(error)[:120]})"
            ) from None
        vocab_size = model_config(config, self.file(CONFIG_FILE)).vocab_size
        if len(vocabulary) != vocab_size or model.output.shape[-1] != vocab_size:
            raise RunDirError(
                f"{self.path}: vocabulary has {len(vocabulary)} words, the model {model.output.shape[-1]}, "
                f"config.json {vocab_size}"
            )
        return CaptionRun(self.path, model, vocabulary, config)


@dataclass
class WorkerRuns:
    """The run directory a training process reads (the chief's) and the one it writes: the same one for
    the chief, a scratch folder for every other worker of a distributed run (removed by `close` unless
    given as `worker_dir`)."""

    source: RunDir
    run: RunDir
    scratch: Path | None = None

    @classmethod
    def open(cls, path: str | Path, is_chief: bool = True, worker_dir: str | Path | None = None) -> WorkerRuns:
        source = RunDir(path)
        if is_chief:
            return cls(source, source)
        if worker_dir is not None:
            Path(worker_dir).mkdir(parents=True, exist_ok=True)
            return cls(source, RunDir(worker_dir))
        scratch = Path(tempfile.mkdtemp(prefix="captioning-worker-"))
        return cls(source, RunDir(scratch), scratch)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def model_config(config: dict, path: Path) -> CaptionModelConfig:
    """Return the run config's model section as a CaptionModelConfig; RunDirError if it is malformed."""
    section = config.get("model")
    if not isinstance(section, dict):
        raise RunDirError(f"{path}: 'model' must be an object of model settings (decoder, vocab_size, ...)")
    try:
        parsed = CaptionModelConfig.from_dict(section)
        get_decoder(parsed.decoder)
    except DecoderError as error:
        raise RunDirError(f"{path}: {error}") from None
    except (TypeError, ValueError) as error:
        raise RunDirError(f"{path}: malformed 'model' settings ({error})") from None
    return parsed


def ensemble_members(run_dir: str | Path) -> list[Path] | None:
    """Return the member run directories of an ensemble directory; None for anything else."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or broken: RunDir.read_config words the error
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
    return RunDir(run_dir).read_config()


def load_run(run_dir: str | Path = DEFAULT_RUN) -> CaptionRun:
    """Return the run's model, vocabulary and config, checking that they agree."""
    return RunDir(run_dir).load()


def load_runs(run_dir: str | Path = DEFAULT_RUN) -> list[CaptionRun]:
    """Return the members of an ensemble directory, or the one run of a run directory."""
    members = ensemble_members(run_dir) if Path(run_dir).is_dir() else None
    return [load_run(run_dir)] if members is None else [load_run(member) for member in members]


def save_model_without_optimizer(model: keras.Model, path: Path) -> None:
    """Save the model's architecture and weights only (small, loadable anywhere), atomically.

    The copy is rebuilt from the model's config without its compile config: `clone_model` of a
    compiled model compiles the clone too on newer Keras (3.15), and its Adam slots would triple the file.
    """
    import keras

    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    clone.save(temporary)
    temporary.replace(path)
