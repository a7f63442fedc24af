"""Training a caption model: data preparation, the fit loop, callbacks, the run directory."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from features.store import FeatureStore, FeatureStoreError, SpatialMaps, spatial_path
from models.attention import build_attention_model
from models.config import REGION_DECODERS, CaptionModelConfig
from models.inject import build_inject_model
from models.merge import build_merge_model
from models.rundir import (
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    VOCABULARY_FILE,
    read_run_config,
    save_model_without_optimizer,
    save_run_config,
    write_json,
)
from pipeline.batches import CaptionSequence, encode_captions
from pipeline.captions import SplitCaptions, load_captions, load_split, select_split
from pipeline.embeddings import EmbeddingCoverage, WordVectors, embedding_matrix, read_word_vectors
from pipeline.vocabulary import Vocabulary

# decoder name -> model builder; the matching steppers are in models.captioner.make_stepper
DECODERS = {"merge": build_merge_model, "inject": build_inject_model, "attention": build_attention_model}

CHECKPOINT_FILE, STATE_FILE = "last_epoch.keras", "last_epoch.json"


class TrainingError(ValueError):
    """Training cannot start: no usable data, or a run directory that does not fit the request."""


@dataclass
class TrainingOptions:
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_count: int = 5
    seed: int = 0
    patience: int = 5
    embeddings: str | None = None  # GloVe-format text file to initialise the word embedding from
    limit_train: int | None = None  # train on the first N images of the train split only (quick comparisons)


@dataclass
class CaptionData:
    """The train and dev captions that have features, and the vocabulary built from train."""

    vocabulary: Vocabulary
    max_caption_length: int
    train: SplitCaptions
    dev: SplitCaptions


def prepare_caption_data(
    store: FeatureStore,
    data_dir: str | Path,
    min_count: int,
    vocabulary: Vocabulary | None = None,
    regions: SpatialMaps | None = None,
    limit_train: int | None = None,
) -> CaptionData:
    """Return train/dev captions restricted to images with features (and spatial maps, when given),
    and the train vocabulary."""
    captions = load_captions(data_dir)
    available = set(store.features) if regions is None else set(store.features) & set(regions.index)
    train = select_split(captions, load_split(data_dir, "train")[:limit_train], available)
    dev = select_split(captions, load_split(data_dir, "dev"), available)
    if not train.image_ids:
        raise TrainingError(f"no train-split image of {data_dir} has features in the store")
    train_captions = [c for i in train.image_ids for c in train.captions[i]]
    if vocabulary is None:
        vocabulary = Vocabulary.build(train_captions, min_count)
    max_caption_length = max(len(c) for c in train_captions) + 2  # + <start>, <end>
    return CaptionData(vocabulary, max_caption_length, train, dev)


def caption_sequence(
    store: FeatureStore,
    split: SplitCaptions,
    data: CaptionData,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    regions: SpatialMaps | None = None,
) -> CaptionSequence:
    """Return the batch generator for one split: pooled vectors as "image", or, given `regions`, the
    spatial maps read batch by batch from the HDF5 file as "regions"."""
    rows, sequences = encode_captions(split.image_ids, split.captions, data.vocabulary, data.max_caption_length)
    ids = split.image_ids
    return CaptionSequence(
        store.matrix(ids) if regions is None else None,
        rows,
        sequences,
        data.max_caption_length,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        extra_inputs=None
        if regions is None
        else {"regions": lambda image_rows: regions.get([ids[r] for r in image_rows])},
    )


def open_spatial_maps(store: FeatureStore, features: str | Path) -> SpatialMaps:
    """Return the spatial maps stored beside the feature store, checked against its encoder."""
    maps = SpatialMaps(spatial_path(features))
    expected = store.metadata.get("spatial_shape")
    if expected is not None and tuple(expected) != maps.shape:
        raise FeatureStoreError(f"{maps.path}: maps of shape {maps.shape}, but {store.encoder} gives {tuple(expected)}")
    return maps


def build_caption_model(config: CaptionModelConfig) -> keras.Model:
    """Return the decoder named by `config.decoder`."""
    if config.decoder not in DECODERS:
        raise TrainingError(f"unknown decoder {config.decoder!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[config.decoder](config)


def initialise_embeddings(model: keras.Model, vocabulary: Vocabulary, vectors: WordVectors) -> EmbeddingCoverage:
    """Copy the pretrained vectors into the model's embedding rows of known words (others stay random)."""
    layer = model.get_layer("embedding")
    matrix, coverage = embedding_matrix(vocabulary, vectors, np.asarray(layer.embeddings))
    layer.embeddings.assign(matrix)
    return coverage


def compile_caption_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        # Mean over real words only: padding has weight 0 and must not dilute the loss.
        loss=keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight"),
        weighted_metrics=["accuracy"],
    )


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the whole model with its optimizer state after every epoch (atomically), for --resume."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def on_epoch_end(self, epoch, logs=None):
        temporary = self.run_dir / f".{CHECKPOINT_FILE}.tmp.keras"
        self.model.save(temporary)
        os.replace(temporary, self.run_dir / CHECKPOINT_FILE)
        write_json(self.run_dir / STATE_FILE, {"epochs_done": epoch + 1})


def plateau_state(
    values: Sequence[float], patience: int, min_delta: float, reset_after_patience: bool
) -> tuple[float | None, int]:
    """Return (best, wait) after `values`, as EarlyStopping (no reset) or ReduceLROnPlateau (reset) count."""
    best, wait = None, 0
    for value in values:
        if best is None or value + abs(min_delta) < best:  # as keras: a fall of more than min_delta
            best, wait = value, 0
            continue
        wait += 1
        if reset_after_patience and wait >= patience:
            wait = 0  # the learning rate was reduced here
    return best, wait


class _ResumedPlateau:
    """Mixin: after --resume, start from the best value and the patience already used in the run."""

    reset_after_patience = False

    def __init__(self, *args, history: Sequence[float] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.history_values = list(history)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = plateau_state(
            self.history_values, self.patience, self.min_delta, self.reset_after_patience
        )


class ResumedEarlyStopping(_ResumedPlateau, keras.callbacks.EarlyStopping):
    """EarlyStopping that counts patience from the best epoch of the whole run."""


class ResumedReduceLROnPlateau(_ResumedPlateau, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that carries on the plateau count of the whole run."""

    reset_after_patience = True


def describe_device() -> str:
    """Return which device TensorFlow trains on."""
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU ({', '.join(g.name for g in gpus)})" if gpus else "CPU (no GPU visible to TensorFlow)"


def _history_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_history(history_csv: Path, out_png: Path) -> None:
    """Draw loss and accuracy per epoch (train and dev) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _history_rows(history_csv)
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "train"), ("val_", "dev")):
            if prefix + metric in rows[0]:
                axis.plot(epochs, [float(r[prefix + metric]) for r in rows], marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(f"per-word {metric}")
        axis.legend()
    figure.tight_layout()
    temporary = out_png.with_name(f".{out_png.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, out_png)


@dataclass
class TrainingResult:
    run_dir: Path
    epochs_run: int
    best_val_loss: float | None
    seconds: float
    train_captions: int
    device: str


def resume_files(run_dir: Path, resume: bool) -> tuple[Path, Path]:
    """Return `run_dir`'s (last-epoch checkpoint, state file); refuse a resume or a restart that cannot be.

    Resuming needs the state file of an interrupted run; starting afresh must not overwrite one.
    """
    checkpoint, state_file = run_dir / CHECKPOINT_FILE, run_dir / STATE_FILE
    if resume and not state_file.is_file():
        raise TrainingError(f"{run_dir}: nothing to resume (no {STATE_FILE}); start without --resume")
    if not resume and state_file.is_file():
        raise TrainingError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    return checkpoint, state_file


def train_caption_model(
    features: str | Path,
    data_dir: str | Path,
    run_dir: str | Path,
    options: TrainingOptions,
    model_options: dict | None = None,
    resume: bool = False,
    verbose: int | None = None,
) -> TrainingResult:
    """Train (or resume) a caption model and write its run directory."""
    run_dir = Path(run_dir)
    checkpoint, state_file = resume_files(run_dir, resume)
    keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()

    model_options = dict(read_run_config(run_dir)["model"] if resume else model_options or {})
    decoder = model_options.get("decoder", "merge")
    if decoder not in DECODERS:
        raise TrainingError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    store = FeatureStore.load(features)
    regions = open_spatial_maps(store, features) if decoder in REGION_DECODERS else None
    vocabulary = Vocabulary.load(run_dir / VOCABULARY_FILE) if resume else None
    data = prepare_caption_data(store, data_dir, options.min_count, vocabulary, regions, options.limit_train)
    train = caption_sequence(store, data.train, data, options.batch_size, True, options.seed, regions)
    dev = caption_sequence(store, data.dev, data, options.batch_size, False, 0, regions) if data.dev.image_ids else None

    initial_epoch, rows = 0, []
    if resume:
        initial_epoch = int(json.loads(state_file.read_text())["epochs_done"])
        model = keras.saving.load_model(checkpoint)  # with its optimizer state
        rows = [r for r in _history_rows(run_dir / HISTORY_FILE) if int(r["epoch"]) < initial_epoch]
        _rewrite_history(run_dir / HISTORY_FILE, rows)
    else:
        vectors = read_word_vectors(options.embeddings, set(data.vocabulary.words)) if options.embeddings else None
        if vectors is not None:
            if model_options.get("embedding_dim", vectors.dim) != vectors.dim:
                raise TrainingError(
                    f"{options.embeddings} holds {vectors.dim}-d vectors but the embedding is "
                    f"{model_options['embedding_dim']}-d; leave --embedding-dim out to use {vectors.dim}"
                )
            model_options["embedding_dim"] = vectors.dim
        if regions is not None:
            model_options["spatial_shape"] = regions.shape
        config = CaptionModelConfig(
            vocab_size=len(data.vocabulary),
            max_caption_length=data.max_caption_length,
            feature_dim=store.dim,
            **model_options,
        )
        model = build_caption_model(config)
        coverage = initialise_embeddings(model, data.vocabulary, vectors) if vectors is not None else None
        if coverage is not None and verbose != 0:
            print(
                f"word vectors: {coverage.found} of {coverage.words} vocabulary words ({coverage.fraction:.1%}) "
                f"found in {options.embeddings}" + (", frozen" if config.freeze_embeddings else "")
            )
        compile_caption_model(model, options.learning_rate)
        run_dir.mkdir(parents=True, exist_ok=True)
        data.vocabulary.save(run_dir / VOCABULARY_FILE)
        save_run_config(
            run_dir,
            {
                **{k: store.metadata[k] for k in ("encoder", "image_size", "preprocessing", "dim", "weights")},
                "feature_dim": store.dim,
                "max_caption_length": data.max_caption_length,
                "vocab_size": len(data.vocabulary),
                "min_count": options.min_count,
                "model": asdict(config),
                "training": asdict(options),
                "data": str(data_dir),
                "features": str(features),
                "train_images": len(data.train.image_ids),
                "dev_images": len(data.dev.image_ids),
                "skipped_images": {"train": len(data.train.skipped), "dev": len(data.dev.skipped)},
                **(
                    {
                        "embeddings": {
                            "file": str(options.embeddings),
                            "dim": vectors.dim,
                            "frozen": config.freeze_embeddings,
                            **coverage.to_dict(),
                        }
                    }
                    if coverage
                    else {}
                ),
            },
        )

    monitor = "val_loss" if dev is not None else "loss"
    # After --resume the callbacks go on from the whole run's history, as if never interrupted.
    past = [float(r[monitor]) for r in rows if r.get(monitor)]
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            run_dir / f".best.{MODEL_FILE}",
            monitor=monitor,
            save_best_only=True,
            initial_value_threshold=min(past) if past else None,
        ),
        ResumedEarlyStopping(monitor=monitor, patience=options.patience, restore_best_weights=True, history=past),
        ResumedReduceLROnPlateau(monitor=monitor, factor=0.5, patience=2, min_lr=1e-5, history=past),
        keras.callbacks.CSVLogger(run_dir / HISTORY_FILE, append=resume),
        EpochCheckpoint(run_dir),
    ]
    if verbose is None:  # a live progress bar on a terminal, one line per epoch in a log
        verbose = 1 if sys.stdout.isatty() else 2
    device = describe_device()
    if verbose:
        print(
            f"training on {device}: {len(train.sequences)} train captions, "
            f"{0 if dev is None else len(dev.sequences)} dev captions, vocabulary {len(data.vocabulary)}"
        )
    started = time.perf_counter()
    history = model.fit(
        train.as_dataset(),
        validation_data=None if dev is None else dev.as_dataset(),
        epochs=options.epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.perf_counter() - started
    if regions is not None:
        regions.close()
    # EarlyStopping restored the best weights only if it stopped early; the best file is the truth.
    best_path = run_dir / f".best.{MODEL_FILE}"
    final = keras.saving.load_model(best_path, compile=False) if best_path.is_file() else model
    save_model_without_optimizer(final, run_dir / MODEL_FILE)
    plot_history(run_dir / HISTORY_FILE, run_dir / CURVES_FILE)
    losses = [float(r[monitor]) for r in _history_rows(run_dir / HISTORY_FILE) if r.get(monitor)]
    return TrainingResult(
        run_dir, len(history.epoch), min(losses) if losses else None, seconds, len(train.sequences), device
    )


def _rewrite_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
