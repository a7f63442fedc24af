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

from features.shards import reading_shards
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
from models.distribute import Replicas, distribution, keras_distributed_fixes
from models.rundir import (
    BACKUP_DIR,
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    VOCABULARY_FILE,
    RunDir,
    WorkerRuns,
    model_config,
)
from pipeline.batches import CaptionSequence, encode_captions
from pipeline.caption_arrays import (
    CaptionData,
    CaptionSelection,
    EncodedCaptionData,
    EncodedCaptions,
    caption_data,
    encode_caption_data_apart,
)
from pipeline.captions import SplitCaptions
from pipeline.datasets import CaptionDataset, as_dataset
from pipeline.embeddings import EmbeddingCoverage, WordVectors, embedding_matrix, read_word_vectors
from pipeline.soft_targets import SoftTargetError, SoftTargets
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
    distribute: str = "none"  # models.distribute.DISTRIBUTE_CHOICES; batch_size is then per replica
    cpu_devices: int | None = None  # mirrored without a GPU: split the CPU into this many logical devices
    backup_every: int | None = None  # distributed: back up every N steps (None: at the end of every epoch)


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
    return with_train_images(
        caption_data(
            dataset, stored_ids(store, regions, spatial), CaptionSelection(min_count, vocabulary, limit_train)
        ),
        dataset,
    )


def with_train_images(data: CaptionData, dataset: CaptionDataset) -> CaptionData:
    """Return `data`, refused when no train image has features."""
    if not data.train.image_ids:
        raise TrainingError(f"no train-split image of {dataset.root} has features in the store")
    return data


def stored_ids(store, regions: SpatialMaps | None = None, spatial: bool = False) -> set[str]:
    """Return the ids that have features (and a spatial map, when `regions` is given or `spatial`)."""
    return store.image_ids(spatial) if regions is None else set(store.features) & set(regions.index)


def caption_batches(
    store,
    split: SplitCaptions,
    data: CaptionData,
    batch_size: int,
    shuffle: bool,
    seed: int,
    spatial: bool,
    encoded: EncodedCaptions | None = None,
    distributions: bool = False,
    soft_targets: SoftTargets | None = None,
) -> CaptionSequence | CaptionStream:
    """Return one split's batches: indexed in memory from a pickle store, streamed from a sharded one
    (its captions `encoded` already, or encoded here). With `distributions` (word-level distillation),
    the next words come as distributions: the teacher's `soft_targets` mixed in, or one-hot."""
    if store.in_memory:
        regions = store.spatial_maps() if spatial else None
        return caption_sequence(store, split, data, batch_size, shuffle, seed, regions, distributions, soft_targets)
    if encoded is None:
        encoded = EncodedCaptions.encode(split.image_ids, split.captions, data.vocabulary, data.max_caption_length)
    return CaptionStream(store, encoded, data.max_caption_length, batch_size, shuffle, seed, spatial)


def caption_sequence(
    store: FeatureStore,
    split: SplitCaptions,
    data: CaptionData,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    regions: SpatialMaps | None = None,
    distributions: bool = False,
    soft_targets: SoftTargets | None = None,
) -> CaptionSequence:
    """Return the batch generator for one split: pooled vectors as "image", or, given `regions`, the
    spatial maps read batch by batch from the HDF5 file as "regions"; next words as ids, or as
    `distributions` (one-hot, or mixed with the teacher's `soft_targets`)."""
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
        vocab_size=len(data.vocabulary) if distributions else None,
        soft_targets=soft_targets,
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


def compile_caption_model(model: keras.Model, learning_rate: float, distributions: bool = False) -> None:
    """Compile for next-word ids, or for next-word `distributions` (word-level distillation's targets)."""
    # Mean over real words only: padding has weight 0 and must not dilute the loss.
    loss = keras.losses.CategoricalCrossentropy if distributions else keras.losses.SparseCategoricalCrossentropy
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss(reduction="mean_with_sample_weight"),
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
    replicas: Replicas
    soft_targets: SoftTargets | None = None  # word-level distillation: targets are distributions

    def datasets(self):
        """Return (train, dev, steps per epoch, dev steps) for `model.fit`.

        The train batches repeat and an epoch is their count in one pass (Keras 3.15 counts one
        optimizer iteration too many when a pass ends the data, which moves Adam's bias correction);
        streamed dev batches repeat too, and a validation is one pass (else Keras warns every epoch
        that the input "ran out of data"). Under a distributed strategy, a sharded store's batches are
        made per worker (its own shards; an epoch is the split's batches over the replicas, so every
        worker runs as many steps) and every replica reads the whole dev split; an in-memory store's
        global batches are split among the local replicas by Keras."""
        dev, train = self.dev, self.train
        dev_steps = None if dev is None or self.store.in_memory else len(dev)
        if not self.replicas.distributed or self.store.in_memory:
            dev_batches = None if dev is None else dev.as_dataset()
            if dev_steps is not None:
                dev_batches = dev_batches.repeat()
            return train.as_dataset().repeat(), dev_batches, len(train), dev_steps
        strategy = self.replicas.strategy
        train_batches = strategy.distribute_datasets_from_function(
            lambda context: train.as_dataset(context.input_pipeline_id, context.num_input_pipelines).repeat()
        )
        dev_batches = None if dev is None else strategy.distribute_datasets_from_function(every_replica(dev))
        return train_batches, dev_batches, -(-len(train) // self.replicas.count), dev_steps

    def close(self) -> None:
        self.store.close()


def every_replica(batches: CaptionStream):
    """Return the dataset function giving every replica every one of `batches` (each batch repeated for
    the worker's replicas in turn): each replica's loss is then the whole split's, and so is their mean,
    and no replica is ever left with an empty batch at the end of the split (the LSTM cannot run on one)."""

    def dataset(context):
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        each = batches.as_dataset().flat_map(lambda *batch: tf.data.Dataset.from_tensors(batch).repeat(local_replicas))
        return each.repeat()

    return dataset


def train_caption_model(
    features: str | Path,
    dataset: CaptionDataset | str | Path,
    run_dir: str | Path,
    options: TrainingOptions,
    model_options: dict | None = None,
    resume: bool = False,
    verbose: int | None = None,
    worker_dir: str | Path | None = None,
    soft_targets: SoftTargets | None = None,
) -> TrainingResult:
    """Train (or resume) a caption model and write its run directory (under a distributed strategy,
    the chief writes it; another worker writes to `worker_dir`, by default a scratch folder). Given a
    teacher's `soft_targets` for the train captions, the train targets mix them with the human words."""
    dataset = as_dataset(dataset)
    replicas = distribution(options.distribute, options.cpu_devices)
    source = RunDir(run_dir)
    if replicas.is_chief:
        source.check_start(resume, replicas.distributed)
    continuing = resume or (replicas.distributed and source.backup_epoch() is not None)
    model_options = dict(source.read_config()["model"] if continuing else model_options or {})
    keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    decoder = model_options.get("decoder", "merge")
    inputs = load_training_inputs(source, features, dataset, options, decoder, continuing, replicas, soft_targets)
    runs = WorkerRuns.open(run_dir, replicas.is_chief, worker_dir)
    try:
        verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose  # a bar on a terminal
        with replicas.strategy.scope():
            start = start_model(runs, inputs, options, model_options, resume, verbose)
        if start.config is not None:
            write_training_config(runs.run, inputs, options, start.config, start.coverage, features, dataset)
        history, seconds = fit(runs, start.model, inputs, options, start.past_rows, start.initial_epoch, verbose)
        return save_best_model(runs.run, start.model, inputs, len(history.epoch), seconds)
    finally:
        inputs.close()
        runs.close()


def load_training_inputs(
    run: RunDir,
    features: str | Path,
    dataset: CaptionDataset,
    options: TrainingOptions,
    decoder: str,
    resume: bool,
    replicas: Replicas,
    soft_targets: SoftTargets | None = None,
) -> TrainingInputs:
    """Phase 1: open the feature store (either kind), select the captions, build the batches (a
    sharded store's of one replica, an in-memory store's of all replicas together)."""
    try:
        spatial = get_decoder(decoder).reads_regions
    except DecoderError as error:
        raise TrainingError(str(error)) from None
    store = open_feature_store(features)
    try:
        check_store_kind(store, features, replicas, soft_targets is not None)
        batch = options.batch_size if not store.in_memory else replicas.global_batch(options.batch_size)
        vocabulary = Vocabulary.load(run.file(VOCABULARY_FILE)) if resume else None
        selection = CaptionSelection(options.min_count, vocabulary, options.limit_train)
        available = stored_ids(store, spatial=spatial)
        if store.in_memory:
            data, encoded = caption_data(dataset, available, selection), None
        else:  # streamed: the captions never held here as Python objects (pipeline/caption_arrays.py)
            encoded = encode_caption_data_apart(dataset, available, selection)
            data = encoded.data
        with_train_images(data, dataset)
        train, dev = split_batches(store, data, encoded, batch, options.seed, spatial, soft_targets)
        if not store.in_memory:
            check_every_worker_has_data(store, data.train.image_ids, replicas.workers)
    except BaseException:
        store.close()
        raise
    return TrainingInputs(store, spatial, data, train, dev, replicas, soft_targets)


def check_store_kind(store, features: str | Path, replicas: Replicas, distilling_words: bool) -> None:
    """Refuse a pickle store where a sharded one is needed (multi-worker) and a sharded one where a
    pickle store is (word-level distillation's soft targets are indexed in memory)."""
    if store.in_memory and replicas.kind == "multi-worker":
        raise TrainingError(
            f"{features}: --distribute multi-worker reads a sharded store, each worker its own shards; "
            f"convert it: python extract_features.py --convert {features} --out FOLDER"
        )
    if distilling_words:
        check_soft_target_store(store, features)


def check_soft_target_store(store, features: str | Path) -> None:
    """Refuse a sharded store for word-level distillation: its soft targets are indexed in memory."""
    if not store.in_memory:
        raise TrainingError(f"{features}: word-level distillation reads a pickle feature store, not shards")


def split_batches(
    store,
    data: CaptionData,
    encoded: EncodedCaptionData | None,
    batch: int,
    seed: int,
    spatial: bool,
    soft_targets: SoftTargets | None,
) -> tuple[CaptionSequence | CaptionStream, CaptionSequence | CaptionStream | None]:
    """Return the train batches (shuffled) and the dev batches (None without dev images). Beside a
    teacher's soft targets, dev's next words are one-hot distributions, for the same loss."""
    distributions = soft_targets is not None
    try:
        train = caption_batches(
            store, data.train, data, batch, True, seed, spatial, encoded and encoded.train, distributions, soft_targets
        )
    except SoftTargetError as error:
        raise TrainingError(str(error)) from None
    if not data.dev.image_ids:
        return train, None
    return train, caption_batches(
        store, data.dev, data, batch, False, 0, spatial, encoded and encoded.dev, distributions
    )


def check_every_worker_has_data(store, image_ids: list[str], workers: int) -> None:
    """Refuse a split of the shards in which some worker would hold no train image (it would have no batches)."""
    for worker in range(workers):
        try:
            paths = store.shard_paths(image_ids, worker, workers)
        except FeatureStoreError as error:
            raise TrainingError(str(error)) from None
        if not paths:
            raise TrainingError(
                f"{store.path}: worker {worker} of {workers} gets no shard with train images; extract with a "
                "smaller --shard-size so every worker's share holds some"
            )


@dataclass
class ModelStart:
    """The model a fit starts from, the history rows it continues, its first epoch; on a fresh start,
    the config and word-vector coverage that config.json records."""

    model: keras.Model
    past_rows: list[dict]
    initial_epoch: int
    config: CaptionModelConfig | None = None
    coverage: EmbeddingCoverage | None = None


def start_model(
    runs: WorkerRuns, inputs: TrainingInputs, options: TrainingOptions, model_options: dict, resume: bool, verbose: int
) -> ModelStart:
    """Phase 2: the model to fit (built in the strategy's scope), the history it continues, its first epoch.

    --resume: the last epoch checkpoint, with its optimizer. A distributed run with a backup (a worker
    failed; the same command was run again): a new model, which BackupAndRestore fills from the backup
    at the start of the fit. Otherwise a new model."""
    if resume:
        initial_epoch = runs.source.epochs_done()
        model = runs.source.load_checkpoint()
    else:
        initial_epoch = runs.source.backup_epoch() if inputs.replicas.distributed else None
        if initial_epoch is None:
            model, config, coverage = new_model(inputs, options, model_options, verbose)
            return ModelStart(model, [], 0, config, coverage)
        model = build_caption_model(model_config(runs.source.read_config(), runs.source.path))
        compile_caption_model(model, options.learning_rate, inputs.soft_targets is not None)
        if verbose:
            print(f"{runs.source.path}: continuing from the backup at epoch {initial_epoch}")
    rows = [r for r in runs.source.read_history() if int(r["epoch"]) < initial_epoch]
    runs.run.write_history(rows)  # an epoch logged after the checkpoint (or backup) is run again
    return ModelStart(model, rows, initial_epoch)


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
    compile_caption_model(model, options.learning_rate, inputs.soft_targets is not None)
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
        "distribution": inputs.replicas.to_config(options.batch_size),
    }
    if inputs.soft_targets is not None:
        run_config["distillation"] = inputs.soft_targets.facts
    if coverage is not None:
        run_config["embeddings"] = {
            "file": str(options.embeddings),
            "dim": config.embedding_dim,
            "frozen": config.freeze_embeddings,
            **coverage.to_dict(),
        }
    run.write_config(run_config)


def fit(
    runs: WorkerRuns,
    model: keras.Model,
    inputs: TrainingInputs,
    options: TrainingOptions,
    past_rows: list[dict],
    initial_epoch: int,
    verbose: int,
) -> tuple[keras.callbacks.History, float]:
    """Phase 4: `model.fit` with the callbacks, which go on from the whole run's history after --resume."""
    run, monitor = runs.run, "val_loss" if inputs.dev is not None else "loss"
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
        *backup_callbacks(runs, inputs.replicas, options.backup_every),
    ]
    if verbose:
        print(
            f"training on {describe_device()}: {inputs.train.caption_count} train captions, "
            f"{0 if inputs.dev is None else inputs.dev.caption_count} dev captions, "
            f"vocabulary {len(inputs.data.vocabulary)}"
        )
        if inputs.replicas.distributed:
            print(inputs.replicas.describe(options.batch_size))
    train, dev, steps_per_epoch, dev_steps = inputs.datasets()
    started = time.perf_counter()
    with reading_shards(None if inputs.store.in_memory else inputs.store.path):
        with keras_distributed_fixes(inputs.replicas.strategy):
            history = model.fit(
                train,
                validation_data=dev,
                epochs=options.epochs,
                steps_per_epoch=steps_per_epoch,
                validation_steps=dev_steps,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the batches shuffle themselves (Keras would warn that it ignores True)
            )
    return history, time.perf_counter() - started


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that writes to this worker's folder but restores from the chief's (TensorFlow's
    own multi-worker recipe): every worker then starts again from the same state."""

    def __init__(self, restore_dir: Path, backup_dir: Path, save_freq: int | str = "epoch"):
        super().__init__(str(backup_dir), save_freq=save_freq)
        self.restore_dir = restore_dir

    def on_train_begin(self, logs=None):
        if self.restore_dir == Path(self.backup_dir):
            return super().on_train_begin(logs)
        writing = (self._weights_path, self._training_metadata_path)
        self._weights_path = str(self.restore_dir / "latest.weights.h5")
        self._training_metadata_path = str(self.restore_dir / "training_metadata.json")
        try:
            super().on_train_begin(logs)
        finally:
            self._weights_path, self._training_metadata_path = writing


def backup_callbacks(runs: WorkerRuns, replicas: Replicas, every: int | None) -> list[keras.callbacks.Callback]:
    """Return the fault-tolerance backup of a distributed run (every `every` steps, else every epoch)."""
    if not replicas.distributed:
        return []
    return [WorkerBackupAndRestore(runs.source.file(BACKUP_DIR), runs.run.file(BACKUP_DIR), every or "epoch")]


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
