"""Training a caption model with teacher forcing: prepare the data, build or resume, fit, save.

`train_caption_model` reads as its phases; each is a function below. The run directory
(`models.rundir.RunDir`) owns every file written.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from features.shards import shard_error
from features.store import (
    FeatureStore,
    FeatureStoreError,
    SpatialMaps,
    atomic_write_bytes,
    open_feature_store,
    spatial_path,
)
from models.config import CaptionModelConfig
from models.decoders import DecoderError, build_decoder_model, get_decoder
from models.rundir import CURVES_FILE, HISTORY_FILE, MODEL_FILE, VOCABULARY_FILE, RunDir
from pipeline.batches import CaptionSequence, encode_captions
from pipeline.captions import SplitCaptions, select_split
from pipeline.datasets import CaptionDataset, as_dataset
from pipeline.embeddings import EmbeddingCoverage, WordVectors, embedding_matrix, read_word_vectors
from pipeline.streaming import CaptionStream
from pipeline.vocabulary import Vocabulary

BEST_MODEL_FILE = f".best.{MODEL_FILE}"  # the best epoch so far, with its optimizer state


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
    store,
    dataset: CaptionDataset,
    min_count: int,
    vocabulary: Vocabulary | None = None,
    regions: SpatialMaps | None = None,
    limit_train: int | None = None,
    spatial: bool = False,
) -> CaptionData:
    """Return train/dev captions restricted to images with features (and spatial maps, when `regions`
    are given or `spatial`), and the train vocabulary. `store`: either kind of feature store."""
    train, dev = select_train_dev(dataset, stored_ids(store, regions, spatial), limit_train)
    if not train.image_ids:
        raise TrainingError(f"no train-split image of {dataset.root} has features in the store")
    train_captions = [c for i in train.image_ids for c in train.captions[i]]
    if vocabulary is None:
        vocabulary = Vocabulary.build(train_captions, min_count)
    max_caption_length = max(len(c) for c in train_captions) + 2  # + <start>, <end>
    return CaptionData(vocabulary, max_caption_length, train, dev)


def stored_ids(store, regions: SpatialMaps | None = None, spatial: bool = False) -> set[str]:
    """Return the ids that have features (and a spatial map, when `regions` is given or `spatial`)."""
    return store.image_ids(spatial) if regions is None else set(store.features) & set(regions.index)


def select_train_dev(
    dataset: CaptionDataset, available: set[str], limit_train: int | None = None
) -> tuple[SplitCaptions, SplitCaptions]:
    """Return the cleaned train (its first `limit_train` images) and dev captions of images in `available`."""
    captions = dataset.captions()
    train = select_split(captions, dataset.split_ids("train")[:limit_train], available)
    return train, select_split(captions, dataset.split_ids("dev"), available)


def caption_batches(
    store, split: SplitCaptions, data: CaptionData, batch_size: int, shuffle: bool, seed: int, spatial: bool
) -> CaptionSequence | CaptionStream:
    """Return one split's batches: indexed in memory from a pickle store, streamed from a sharded one."""
    if store.in_memory:
        regions = store.spatial_maps() if spatial else None
        return caption_sequence(store, split, data, batch_size, shuffle, seed, regions)
    captions = (split.image_ids, split.captions, data.vocabulary, data.max_caption_length)
    return CaptionStream(store, *captions, batch_size=batch_size, shuffle=shuffle, seed=seed, spatial=spatial)


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
    """Return the decoder named by `config.decoder` (models.decoders)."""
    try:
        return build_decoder_model(config)
    except DecoderError as error:
        raise TrainingError(str(error)) from None


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

    def __init__(self, run: RunDir):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.run.save_checkpoint(self.model, epoch + 1)


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


def plot_history(run: RunDir) -> None:
    """Draw loss and accuracy per epoch (train and dev) of the run's history to its curves PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run.read_history()
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(run.file(CURVES_FILE), buffer.getvalue())


@dataclass
class TrainingResult:
    run_dir: Path
    epochs_run: int
    best_val_loss: float | None
    seconds: float
    train_captions: int
    device: str


@dataclass
class TrainingInputs:
    """What a fit reads: the features (either kind of store), the captions and vocabulary, and the
    batches of both splits."""

    store: FeatureStore
    spatial: bool  # the decoder reads spatial maps ("regions"), not pooled vectors
    data: CaptionData
    train: CaptionSequence | CaptionStream
    dev: CaptionSequence | CaptionStream | None

    def close(self) -> None:
        self.store.close()


def train_caption_model(
    features: str | Path,
    dataset: CaptionDataset | str | Path,
    run_dir: str | Path,
    options: TrainingOptions,
    model_options: dict | None = None,
    resume: bool = False,
    verbose: int | None = None,
) -> TrainingResult:
    """Train (or resume) a caption model and write its run directory."""
    dataset = as_dataset(dataset)
    run = RunDir(run_dir)
    run.check_start(resume)
    keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    model_options = dict(run.read_config()["model"] if resume else model_options or {})
    inputs = load_training_inputs(run, features, dataset, options, model_options.get("decoder", "merge"), resume)
    try:
        if resume:
            model, past_rows, initial_epoch = resume_model(run)
        else:
            model, config, coverage = new_model(inputs, options, model_options, verbose)
            write_training_config(run, inputs, options, config, coverage, features, dataset)
            past_rows, initial_epoch = [], 0
        verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose  # a bar on a terminal
        history, seconds = fit(run, model, inputs, options, past_rows, initial_epoch, verbose)
    finally:
        inputs.close()
    return save_best_model(run, model, inputs, len(history.epoch), seconds)


def load_training_inputs(
    run: RunDir, features: str | Path, dataset: CaptionDataset, options: TrainingOptions, decoder: str, resume: bool
) -> TrainingInputs:
    """Phase 1: open the feature store (either kind), select the captions, build the batches."""
    try:
        spatial = get_decoder(decoder).reads_regions
    except DecoderError as error:
        raise TrainingError(str(error)) from None
    store = open_feature_store(features)
    try:
        vocabulary = Vocabulary.load(run.file(VOCABULARY_FILE)) if resume else None
        data = prepare_caption_data(store, dataset, options.min_count, vocabulary, None, options.limit_train, spatial)
        train = caption_batches(store, data.train, data, options.batch_size, True, options.seed, spatial)
        dev = (
            caption_batches(store, data.dev, data, options.batch_size, False, 0, spatial)
            if data.dev.image_ids
            else None
        )
    except BaseException:
        store.close()
        raise
    return TrainingInputs(store, spatial, data, train, dev)


def resume_model(run: RunDir) -> tuple[keras.Model, list[dict], int]:
    """Phase 2 on --resume: the last checkpoint (with its optimizer), the history up to it, its epoch."""
    initial_epoch = run.epochs_done()
    rows = [r for r in run.read_history() if int(r["epoch"]) < initial_epoch]
    run.write_history(rows)  # an epoch logged after the last checkpoint is run again
    return run.load_checkpoint(), rows, initial_epoch


def new_model(
    inputs: TrainingInputs, options: TrainingOptions, model_options: dict, verbose: int | None
) -> tuple[keras.Model, CaptionModelConfig, EmbeddingCoverage | None]:
    """Phase 2 on a fresh start: build and compile the decoder, start from word vectors if given."""
    data = inputs.data
    vectors = read_word_vectors(options.embeddings, set(data.vocabulary.words)) if options.embeddings else None
    if vectors is not None:
        if model_options.get("embedding_dim", vectors.dim) != vectors.dim:
            raise TrainingError(
                f"{options.embeddings} holds {vectors.dim}-d vectors but the embedding is "
                f"{model_options['embedding_dim']}-d; leave --embedding-dim out to use {vectors.dim}"
            )
        model_options["embedding_dim"] = vectors.dim
    if inputs.spatial:
        model_options["spatial_shape"] = inputs.store.spatial_shape
    config = CaptionModelConfig(
        vocab_size=len(data.vocabulary),
        max_caption_length=data.max_caption_length,
        feature_dim=inputs.store.dim,
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
    return model, config, coverage


def write_training_config(
    run: RunDir,
    inputs: TrainingInputs,
    options: TrainingOptions,
    config: CaptionModelConfig,
    coverage: EmbeddingCoverage | None,
    features: str | Path,
    dataset: CaptionDataset,
) -> None:
    """Phase 3 on a fresh start: the vocabulary and config.json, each fact once."""
    data = inputs.data
    run.path.mkdir(parents=True, exist_ok=True)
    data.vocabulary.save(run.file(VOCABULARY_FILE))
    run_config = {
        **{k: inputs.store.metadata[k] for k in ("encoder", "image_size", "preprocessing", "weights")},
        "model": asdict(config),
        "training": asdict(options),
        **dataset.run_facts(),
        "features": str(features),
        "train_images": len(data.train.image_ids),
        "dev_images": len(data.dev.image_ids),
        "skipped_images": {"train": len(data.train.skipped), "dev": len(data.dev.skipped)},
    }
    if coverage is not None:
        run_config["embeddings"] = {
            "file": str(options.embeddings),
            "dim": config.embedding_dim,
            "frozen": config.freeze_embeddings,
            **coverage.to_dict(),
        }
    run.write_config(run_config)


def fit(
    run: RunDir,
    model: keras.Model,
    inputs: TrainingInputs,
    options: TrainingOptions,
    past_rows: list[dict],
    initial_epoch: int,
    verbose: int,
) -> tuple[keras.callbacks.History, float]:
    """Phase 4: `model.fit` with the callbacks, which go on from the whole run's history after --resume."""
    monitor = "val_loss" if inputs.dev is not None else "loss"
    past = [float(r[monitor]) for r in past_rows if r.get(monitor)]
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            run.file(BEST_MODEL_FILE),
            monitor=monitor,
            save_best_only=True,
            initial_value_threshold=min(past) if past else None,
        ),
        ResumedEarlyStopping(monitor=monitor, patience=options.patience, restore_best_weights=True, history=past),
        ResumedReduceLROnPlateau(monitor=monitor, factor=0.5, patience=2, min_lr=1e-5, history=past),
        keras.callbacks.CSVLogger(run.file(HISTORY_FILE), append=initial_epoch > 0),
        EpochCheckpoint(run),
    ]
    if verbose:
        print(
            f"training on {describe_device()}: {inputs.train.caption_count} train captions, "
            f"{0 if inputs.dev is None else inputs.dev.caption_count} dev captions, "
            f"vocabulary {len(inputs.data.vocabulary)}"
        )
    started = time.perf_counter()
    try:
        history = model.fit(
            inputs.train.as_dataset(),
            validation_data=None if inputs.dev is None else inputs.dev.as_dataset(),
            epochs=options.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=verbose,
        )
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        if inputs.store.in_memory:
            raise
        raise shard_error(inputs.store.path, error) from None
    return history, time.perf_counter() - started


def save_best_model(
    run: RunDir, model: keras.Model, inputs: TrainingInputs, epochs_run: int, seconds: float
) -> TrainingResult:
    """Phase 5: the best epoch's model without optimizer state, the curves, and the result."""
    # EarlyStopping restored the best weights only if it stopped early; the best file is the truth.
    best_path = run.file(BEST_MODEL_FILE)
    run.save_model(keras.saving.load_model(best_path, compile=False) if best_path.is_file() else model)
    plot_history(run)
    monitor = "val_loss" if inputs.dev is not None else "loss"
    losses = [float(r[monitor]) for r in run.read_history() if r.get(monitor)]
    best = min(losses) if losses else None
    return TrainingResult(run.path, epochs_run, best, seconds, inputs.train.caption_count, describe_device())
