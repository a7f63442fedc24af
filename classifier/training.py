"""Training an image-classifier head on a class-per-folder image set, into a run directory.

Images -> feature store (extracted once, resumable) -> stratified train/validation split ->
optional augmented variants of the train images in a store of their own -> fit -> run directory.
With `fine_tune_blocks` = N, the store is replaced by a cache of the activations entering the
encoder's last N blocks, and the fit has two phases (classifier/finetune.py): the head
alone on the pooled vectors, then the last N blocks and the head together at `fine_tune_lr`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from classifier.activations import CachedActivations
from classifier.classes import ClassFolder, LabelledBatches, load_class_folder, stratified_split
from classifier.finetune import build_fine_tuned_classifier
from classifier.model import (
    CLASSES_FILE,
    SPLIT_FILE,
    TASK,
    ClassifierConfig,
    ClassifierError,
    HeadInputs,
    augmented_store_path,
    build_classifier,
    compile_classifier,
    default_store_path,
    predict_probabilities,
    prepare_inputs,
    write_classifier_config,
)
from classifier.streaming import LabelledStream, keras_data
from features.augment import AUGMENTATIONS, augment_pixels, augmented_sources, original_id
from features.encoders import EncoderSpec, build_encoder_split, get_encoder_spec
from features.extract import _weights_label
from features.shards import reading_shards
from models.rundir import HISTORY_FILE, MODEL_FILE, RunDir, save_model_without_optimizer, write_json
from models.training import describe_device, plot_history

BEST_MODEL_FILE = f".best.{MODEL_FILE}"  # the best epoch so far, while the fit runs
Batches = LabelledBatches | LabelledStream  # in-memory arrays, or streamed from a sharded store


@dataclass
class ClassifierTrainingOptions:
    head: str = "dense"
    augmentations: list[str] = field(default_factory=list)  # names from features.augment; [] = none
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0  # weights, shuffling and (unless split_seed is set) the train/validation split
    split_seed: int | None = None  # the train/validation split alone; None = seed
    validation_fraction: float = 0.2
    patience: int = 5
    units: int = 256  # dense head; 0 = no hidden layer
    rnn_units: int = 128
    dropout: float = 0.5
    l2: float = 0.0
    label_smoothing: float = 0.0
    encoder: str = "efficientnet_lite0"
    weights: str = "imagenet"
    fine_tune_blocks: int = 0  # last encoder blocks trained with the head (dense head only); 0 = none
    fine_tune_epochs: int = 10  # phase 2: top blocks + head together
    fine_tune_lr: float = 1e-4

    def check(self) -> None:
        """Raise ClassifierError for a training option no run could use (the head checks its own)."""
        unknown = sorted(set(self.augmentations) - set(AUGMENTATIONS))
        if unknown:
            raise ClassifierError(
                f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ClassifierError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.fine_tune_blocks and (self.fine_tune_epochs < 1 or self.fine_tune_lr <= 0):
            raise ClassifierError(
                f"fine-tuning needs positive epochs and learning rate, got {self.fine_tune_epochs} and {self.fine_tune_lr}"
            )


@dataclass
class ClassifierTrainingResult:
    run_dir: Path
    epochs_run: int
    best_val_loss: float
    val_accuracy: float  # of the saved (best) model on the validation split
    seconds: float  # the fit only (both phases when fine-tuning), features already extracted
    train_images: int  # originals; augmented variants come on top
    augmented_images: int
    validation_images: int
    device: str
    empty_classes: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # image id -> reason
    fine_tune_epochs_run: int = 0  # of epochs_run, those of phase 2 (top blocks + head)


def _callbacks(
    run_dir: Path, best_path: Path | None, patience: int, best_so_far: float | None = None
) -> list[keras.callbacks.Callback]:
    """Return the callbacks of one fit: best-val_loss checkpoint, early stopping, LR schedule, CSV log.

    `best_so_far`: the validation loss an earlier phase reached; the checkpoint saves only a better
    model, and the CSV log carries on the earlier phase's rows.
    """
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5),
        keras.callbacks.CSVLogger(run_dir / HISTORY_FILE, append=best_so_far is not None),
    ]
    if best_path is not None:
        callbacks.insert(
            0,
            keras.callbacks.ModelCheckpoint(
                best_path, monitor="val_loss", save_best_only=True, initial_value_threshold=best_so_far
            ),
        )
    return callbacks


def train_classifier(
    data_dir: str | Path,
    run_dir: str | Path,
    options: ClassifierTrainingOptions,
    features: str | Path | None = None,
    progress: bool = True,
    verbose: int | None = None,
) -> ClassifierTrainingResult:
    """Extract features (if not cached), split, train the head and write the run directory."""
    run_dir = Path(run_dir)
    spec = start_run(run_dir, options)
    folder = load_class_folder(data_dir)
    # Built before extraction, so a head that cannot be built fails in a second, not after minutes.
    models = build_models(options, spec, len(folder.classes))
    store_path = Path(features) if features else default_store_path(data_dir, options.encoder, len(folder.sources))
    data = prepare_data(folder, store_path, options, models.config, progress)
    write_run_files(run_dir, data_dir, options, spec, models, data)
    train, validation = data.batches(options.batch_size, options.seed)
    if verbose is None:  # a live progress bar on a terminal, one line per epoch in a log
        verbose = 1 if sys.stdout.isatty() else 2
    device = describe_device()
    if verbose:
        print(describe_fit(options, data, device))
    started = time.perf_counter()
    stream_path = data.store_path if data.streams else None
    epochs_run, fine_tune_epochs_run = fit(models, train, validation, options, run_dir, verbose, stream_path)
    seconds = time.perf_counter() - started
    loss, accuracy = save_best_model(models.model, run_dir, validation, options, stream_path)
    return ClassifierTrainingResult(
        run_dir=run_dir,
        epochs_run=epochs_run,
        best_val_loss=loss,
        val_accuracy=accuracy,
        seconds=seconds,
        train_images=len(data.train_ids),
        augmented_images=len(data.augmented_ids),
        validation_images=len(data.validation_ids),
        device=device,
        empty_classes=folder.empty_classes,
        unreadable=data.originals.failed,
        fine_tune_epochs_run=fine_tune_epochs_run,
    )


# ---- the phases: start, build, prepare the data, write the run, fit, save ----


def start_run(run_dir: Path, options: ClassifierTrainingOptions) -> EncoderSpec:
    """Return the encoder's spec after refusing a used run directory or bad options, and seeding everything."""
    if (run_dir / MODEL_FILE).exists() or (run_dir / HISTORY_FILE).exists():
        raise ClassifierError(f"{run_dir} already holds a training run; choose another --out")
    options.check()
    spec = get_encoder_spec(options.encoder)
    keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    return spec


@dataclass
class ClassifierModels:
    """What a run trains: the model that reads the inputs and the head inside it."""

    config: ClassifierConfig
    model: keras.Model  # inputs -> probabilities: the head, or the encoder's top blocks and the head
    head: keras.Model  # the head alone; the same object as `model` without fine-tuning
    top: keras.Model | None = None  # the encoder's last blocks, trained with the head; None = frozen encoder

    @property
    def fine_tune(self) -> bool:
        return self.top is not None


def build_models(options: ClassifierTrainingOptions, spec: EncoderSpec, num_classes: int) -> ClassifierModels:
    """Return the head, or the encoder's top blocks and the head, for `options` (refusing impossible ones)."""
    config = ClassifierConfig(
        num_classes=num_classes,
        feature_dim=spec.dim,
        spatial_shape=tuple(spec.spatial_shape),
        head=options.head,
        units=options.units,
        rnn_units=options.rnn_units,
        dropout=options.dropout,
        l2=options.l2,
    )
    if options.fine_tune_blocks <= 0:
        model = build_classifier(config)
        return ClassifierModels(config, model, model)
    config.fine_tune_blocks = options.fine_tune_blocks
    build_classifier(config)  # refuses a gru head at once
    _, top = build_encoder_split(options.encoder, options.weights, options.fine_tune_blocks)
    model, head = build_fine_tuned_classifier(config, top)
    return ClassifierModels(config, model, head, top)


@dataclass
class TrainingData:
    """The split of a class folder and where the model's inputs for it are, augmented variants included.

    Inputs in a sharded feature store stream through `tf.data` (`classifier.streaming`); a pickle
    store's are read into arrays; a fine-tuned run's activations are read from their cache batch by
    batch (`classifier.activations.CachedActivations`).
    """

    folder: ClassFolder
    store_path: Path
    split_seed: int
    train_ids: list[str]
    validation_ids: list[str]
    originals: HeadInputs
    augmented: HeadInputs | None = None
    augmented_ids: list[str] = field(default_factory=list)

    @property
    def streams(self) -> bool:
        return self.originals.stream is not None and (self.augmented is None or self.augmented.stream is not None)

    def labels(self, ids: list[str]) -> dict[str, int]:
        """Return {id: class index} of image ids, augmented variants (`id#flip`) by their original."""
        return {i: self.folder.labels[original_id(i)] for i in ids}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return (train inputs, their labels, validation inputs, their labels): arrays, or cached activations;
        the train rows are the train images, then their augmented variants."""
        train_inputs = self.originals.read(self.train_ids)
        if self.augmented is not None:
            variants = self.augmented.read(self.augmented_ids)
            if isinstance(train_inputs, CachedActivations):  # a fine-tuned run: read from its cache when batched
                train_inputs = train_inputs + variants
            else:
                train_inputs = np.concatenate([train_inputs, variants])
        train_labels = np.array(list(self.labels(self.train_ids + self.augmented_ids).values()))
        validation_labels = np.array(list(self.labels(self.validation_ids).values()))
        return train_inputs, train_labels, self.originals.read(self.validation_ids), validation_labels

    def batches(self, batch_size: int, seed: int) -> tuple[Batches, Batches]:
        """Return (train batches reshuffled every epoch, validation batches in order)."""
        if not self.streams:
            train_inputs, train_labels, validation_inputs, validation_labels = self.arrays()
            train = LabelledBatches(train_inputs, train_labels, batch_size, shuffle=True, seed=seed)
            return train, LabelledBatches(validation_inputs, validation_labels, batch_size, shuffle=False)
        parts = [self.originals.part(self.labels(self.train_ids))]
        if self.augmented is not None:
            parts.append(self.augmented.part(self.labels(self.augmented_ids)))
        spatial = self.originals.spatial
        validation = [self.originals.part(self.labels(self.validation_ids))]
        return (
            LabelledStream(parts, batch_size, shuffle=True, seed=seed, spatial=spatial),
            LabelledStream(validation, batch_size, shuffle=False, spatial=spatial),
        )


def prepare_data(
    folder: ClassFolder,
    store_path: Path,
    options: ClassifierTrainingOptions,
    config: ClassifierConfig,
    progress: bool,
) -> TrainingData:
    """Return the split and the model's inputs, encoding the images (and variants) not yet cached."""
    originals = prepare_inputs(folder.sources, store_path, options.encoder, options.weights, config, progress)
    usable = [i for i in folder.sources if i in originals.available]
    split_seed = options.seed if options.split_seed is None else options.split_seed
    train_ids, validation_ids = stratified_split(usable, folder.labels, options.validation_fraction, split_seed)
    augmented, augmented_ids = None, []
    if options.augmentations:
        augmented, augmented_ids = augment_train_images(folder, train_ids, store_path, options, config, progress)
    return TrainingData(folder, store_path, split_seed, train_ids, validation_ids, originals, augmented, augmented_ids)


def augment_train_images(
    folder: ClassFolder,
    train_ids: list[str],
    store_path: Path,
    options: ClassifierTrainingOptions,
    config: ClassifierConfig,
    progress: bool,
) -> tuple[HeadInputs, list[str]]:
    """Return the inputs of the train images' augmented variants and the ids of the readable ones.

    The variants go to a store of their own beside the originals' (`augmented_store_path`):
    validation never sees them.
    """
    variants = augmented_sources({i: folder.sources[i] for i in train_ids}, options.augmentations)
    augmented = prepare_inputs(
        variants,
        augmented_store_path(store_path),
        options.encoder,
        options.weights,
        config,
        progress,
        augment=augment_pixels,
    )
    return augmented, sorted(i for i in variants if i in augmented.available)


def write_run_files(
    run_dir: Path,
    data_dir: str | Path,
    options: ClassifierTrainingOptions,
    spec: EncoderSpec,
    models: ClassifierModels,
    data: TrainingData,
) -> None:
    """Write classes.json, split.json and config.json into the run directory, before the fit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CLASSES_FILE, data.folder.classes)
    write_json(
        run_dir / SPLIT_FILE,
        {
            "seed": data.split_seed,
            "validation_fraction": options.validation_fraction,
            "train": data.train_ids,
            "validation": data.validation_ids,
        },
    )
    write_classifier_config(run_dir, run_config(data_dir, options, spec, models, data))


def run_config(
    data_dir: str | Path,
    options: ClassifierTrainingOptions,
    spec: EncoderSpec,
    models: ClassifierModels,
    data: TrainingData,
) -> dict:
    """Return the run's config.json: the encoder, the head, the data and how the run was trained."""
    fine_tune = models.fine_tune
    return {
        "task": TASK,
        **{k: spec.metadata()[k] for k in ("encoder", "image_size", "preprocessing")},
        "weights": _weights_label(options.weights),
        "feature_dim": spec.dim,
        "spatial_shape": list(spec.spatial_shape),
        "head": options.head,
        "classes": data.folder.classes,
        "split_seed": data.split_seed,
        "validation_fraction": options.validation_fraction,
        "model": models.config.to_dict(),
        "training": asdict(options),
        "data": str(Path(data_dir).resolve()),
        "features": str(data.store_path),
        "augmented_features": str(augmented_store_path(data.store_path)) if options.augmentations else None,
        # a fine-tuned model reads the activations that enter its first block, cached here:
        "activations": str(data.originals.path) if fine_tune else None,
        "augmented_activations": str(data.augmented.path) if fine_tune and data.augmented else None,
        "activation_shape": list(models.model.input.shape[1:]) if fine_tune else None,
        "train_images": len(data.train_ids),
        "augmented_images": len(data.augmented_ids),
        "validation_images": len(data.validation_ids),
        "class_counts": data.folder.counts(),
        "empty_classes": data.folder.empty_classes,
        "unreadable_images": sorted(data.originals.failed),
    }


def describe_fit(options: ClassifierTrainingOptions, data: TrainingData, device: str) -> str:
    """Return the line printed before the fit: what trains, on which device, on how many images."""
    blocks = f" with the last {options.fine_tune_blocks} encoder blocks" if options.fine_tune_blocks > 0 else ""
    augmented = f" + {len(data.augmented_ids)} augmented" if data.augmented_ids else ""
    return (
        f"training the {options.head} head{blocks} on {device}: {len(data.train_ids)} train images{augmented}, "
        f"{len(data.validation_ids)} validation images, {len(data.folder.classes)} classes"
    )


def fit(
    models: ClassifierModels,
    train: Batches,
    validation: Batches,
    options: ClassifierTrainingOptions,
    run_dir: Path,
    verbose: int,
    stream_path: Path | None = None,
) -> tuple[int, int]:
    """Compile and fit the model, checkpointing the best epoch; return (epochs run, of them fine-tuning).

    `stream_path`: the sharded store the batches stream from, named by the error a bad shard gives.
    """
    compile_classifier(models.model, options.learning_rate, options.label_smoothing)
    if not models.fine_tune:
        with reading_shards(stream_path):
            history = models.model.fit(
                epochs=options.epochs,
                callbacks=_callbacks(run_dir, run_dir / BEST_MODEL_FILE, options.patience),
                verbose=verbose,
                **fit_arguments(train, validation),
            )
        return len(history.epoch), 0
    epochs_run, best_val_loss = fit_head_alone(models, train, validation, options, run_dir, verbose)
    fine_tune_epochs_run = fit_top_and_head(
        models, train, validation, options, run_dir, verbose, epochs_run, best_val_loss
    )
    return epochs_run + fine_tune_epochs_run, fine_tune_epochs_run


def fit_arguments(train: Batches, validation: Batches) -> dict:
    """Return `model.fit`'s data arguments for in-memory batches or streams."""
    (x, steps), (validation_data, validation_steps) = keras_data(train, True), keras_data(validation, True)
    arguments = {"x": x, "validation_data": validation_data}
    if steps is not None:  # a stream shuffles itself (Keras would warn that it ignores shuffle=True)
        arguments.update(steps_per_epoch=steps, validation_steps=validation_steps, shuffle=False)
    return arguments


def fit_head_alone(
    models: ClassifierModels,
    train: LabelledBatches,
    validation: LabelledBatches,
    options: ClassifierTrainingOptions,
    run_dir: Path,
    verbose: int,
) -> tuple[int, float]:
    """Fine-tuning, phase 1: fit the head alone on the pooled vectors of the unchanged top, which runs once here.

    Returns (epochs run, best validation loss). The top reads the cached activations chunk by chunk
    (`train.inputs`); its pooled vectors, one per image, are what this phase holds in memory.
    """
    pooled_train, pooled_validation = (predict_probabilities(models.top, b.inputs) for b in (train, validation))
    compile_classifier(models.head, options.learning_rate, options.label_smoothing)
    history = models.head.fit(
        LabelledBatches(pooled_train, train.labels, options.batch_size, shuffle=True, seed=options.seed),
        validation_data=LabelledBatches(pooled_validation, validation.labels, options.batch_size, shuffle=False),
        epochs=options.epochs,
        callbacks=_callbacks(run_dir, None, options.patience),
        verbose=verbose,
    )
    return len(history.epoch), min(history.history["val_loss"])


def fit_top_and_head(
    models: ClassifierModels,
    train: LabelledBatches,
    validation: LabelledBatches,
    options: ClassifierTrainingOptions,
    run_dir: Path,
    verbose: int,
    epochs_done: int,
    best_val_loss: float,
) -> int:
    """Fine-tuning, phase 2: fit the top blocks and the head together, slowly; return the epochs run.

    Phase 1's model stays the saved one unless an epoch of phase 2 beats its validation loss.
    """
    best_path = run_dir / BEST_MODEL_FILE
    compile_classifier(models.model, options.fine_tune_lr, options.label_smoothing)
    models.model.save(best_path)
    history = models.model.fit(
        train,
        validation_data=validation,
        initial_epoch=epochs_done,
        epochs=epochs_done + options.fine_tune_epochs,
        callbacks=_callbacks(run_dir, best_path, options.patience, best_val_loss),
        verbose=verbose,
    )
    return len(history.epoch)


def save_best_model(
    model: keras.Model,
    run_dir: Path,
    validation: Batches,
    options: ClassifierTrainingOptions,
    stream_path: Path | None = None,
) -> tuple[float, float]:
    """Save the fit's best model as the run's, draw the curves; return its validation (loss, accuracy)."""
    best_path = run_dir / BEST_MODEL_FILE
    final = keras.saving.load_model(best_path, compile=False) if best_path.is_file() else model
    save_model_without_optimizer(final, run_dir / MODEL_FILE)
    best_path.unlink(missing_ok=True)
    plot_history(RunDir(run_dir))
    compile_classifier(final, options.learning_rate, options.label_smoothing)
    with reading_shards(stream_path):
        loss, accuracy = final.evaluate(keras_data(validation, False)[0], verbose=0)
    return float(loss), float(accuracy)
