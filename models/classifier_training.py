"""Training an image-classifier head on a class-per-folder image set, into a run directory.

Images -> feature store (extracted once, resumable) -> stratified train/validation split ->
optional augmented variants of the train images in a store of their own -> fit -> run directory.
With `fine_tune_blocks` = N, the store is replaced by a cache of the activations entering the
encoder's last N blocks, and the fit has two phases (models/classifier_finetune.py): the head
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

from features.augment import AUGMENTATIONS, augment_pixels, augmented_sources, original_id
from features.encoders import build_encoder_split, get_encoder_spec
from features.extract import _weights_label
from models.classifier import (
    CLASSES_FILE,
    SPLIT_FILE,
    TASK,
    ClassifierConfig,
    ClassifierError,
    augmented_store_path,
    build_classifier,
    compile_classifier,
    default_store_path,
    predict_probabilities,
    prepare_inputs,
)
from models.classifier_finetune import build_fine_tuned_classifier
from models.rundir import (
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    save_model_without_optimizer,
    save_run_config,
    write_json,
)
from models.training import describe_device, plot_history
from pipeline.classes import LabelledBatches, load_class_folder, stratified_split


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
    if (run_dir / MODEL_FILE).exists() or (run_dir / HISTORY_FILE).exists():
        raise ClassifierError(f"{run_dir} already holds a training run; choose another --out")
    options.check()
    spec = get_encoder_spec(options.encoder)
    keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    folder = load_class_folder(data_dir)
    # Built before extraction, so a head that cannot be built fails in a second, not after minutes.
    config = ClassifierConfig(
        num_classes=len(folder.classes),
        feature_dim=spec.dim,
        spatial_shape=tuple(spec.spatial_shape),
        head=options.head,
        units=options.units,
        rnn_units=options.rnn_units,
        dropout=options.dropout,
        l2=options.l2,
    )
    fine_tune = options.fine_tune_blocks > 0
    if fine_tune:
        config.fine_tune_blocks = options.fine_tune_blocks
        build_classifier(config)  # refuses a gru head at once
        bottom, top = build_encoder_split(options.encoder, options.weights, options.fine_tune_blocks)
        model, head = build_fine_tuned_classifier(config, top)
    else:
        model = head = build_classifier(config)
    store_path = Path(features) if features else default_store_path(data_dir, options.encoder)
    originals = prepare_inputs(folder.sources, store_path, options.encoder, options.weights, config, progress)
    usable = [i for i in folder.sources if i in originals.available]
    split_seed = options.seed if options.split_seed is None else options.split_seed
    train_ids, validation_ids = stratified_split(usable, folder.labels, options.validation_fraction, split_seed)
    train_inputs = originals.read(train_ids)
    train_labels = np.array([folder.labels[i] for i in train_ids])
    augmented_ids: list[str] = []
    augmented_path = augmented_store_path(store_path)
    augmented = None
    if options.augmentations:
        # Variants of the train images only, in their own store: validation never sees them.
        variants = augmented_sources({i: folder.sources[i] for i in train_ids}, options.augmentations)
        augmented = prepare_inputs(
            variants, augmented_path, options.encoder, options.weights, config, progress, augment=augment_pixels
        )
        augmented_ids = sorted(i for i in variants if i in augmented.available)
        train_inputs = np.concatenate([train_inputs, augmented.read(augmented_ids)])
        train_labels = np.concatenate([train_labels, [folder.labels[original_id(i)] for i in augmented_ids]])
    validation_inputs = originals.read(validation_ids)
    validation_labels = np.array([folder.labels[i] for i in validation_ids])

    compile_classifier(model, options.learning_rate, options.label_smoothing)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CLASSES_FILE, folder.classes)
    write_json(
        run_dir / SPLIT_FILE,
        {
            "seed": split_seed,
            "validation_fraction": options.validation_fraction,
            "train": train_ids,
            "validation": validation_ids,
        },
    )
    save_run_config(
        run_dir,
        {
            "task": TASK,
            **{k: spec.metadata()[k] for k in ("encoder", "image_size", "preprocessing")},
            "weights": _weights_label(options.weights),
            "feature_dim": spec.dim,
            "spatial_shape": list(spec.spatial_shape),
            "head": options.head,
            "classes": folder.classes,
            "split_seed": split_seed,
            "validation_fraction": options.validation_fraction,
            "model": config.to_dict(),
            "training": asdict(options),
            "data": str(Path(data_dir).resolve()),
            "features": str(store_path),
            "augmented_features": str(augmented_path) if options.augmentations else None,
            # a fine-tuned model reads the activations that enter its first block, cached here:
            "activations": str(originals.path) if fine_tune else None,
            "augmented_activations": str(augmented.path) if fine_tune and augmented else None,
            "activation_shape": list(model.input.shape[1:]) if fine_tune else None,
            "train_images": len(train_ids),
            "augmented_images": len(augmented_ids),
            "validation_images": len(validation_ids),
            "class_counts": folder.counts(),
            "empty_classes": folder.empty_classes,
            "unreadable_images": sorted(originals.failed),
        },
    )

    best_path = run_dir / f".best.{MODEL_FILE}"
    train = LabelledBatches(train_inputs, train_labels, options.batch_size, shuffle=True, seed=options.seed)
    validation = LabelledBatches(validation_inputs, validation_labels, options.batch_size, shuffle=False)
    if verbose is None:  # a live progress bar on a terminal, one line per epoch in a log
        verbose = 1 if sys.stdout.isatty() else 2
    device = describe_device()
    if verbose:
        print(
            f"training the {options.head} head"
            f"{f' with the last {options.fine_tune_blocks} encoder blocks' if fine_tune else ''} on {device}: "
            f"{len(train_ids)} train images"
            f"{f' + {len(augmented_ids)} augmented' if augmented_ids else ''}, "
            f"{len(validation_ids)} validation images, {len(folder.classes)} classes"
        )
    started = time.perf_counter()
    fine_tune_epochs_run = 0
    if not fine_tune:
        history = model.fit(
            train,
            validation_data=validation,
            epochs=options.epochs,
            callbacks=_callbacks(run_dir, best_path, options.patience),
            verbose=verbose,
        )
        epochs_run = len(history.epoch)
    else:
        # Phase 1: the head alone on the pooled vectors of the unchanged top, which runs once here.
        pooled_train, pooled_validation = (predict_probabilities(top, x) for x in (train_inputs, validation_inputs))
        compile_classifier(head, options.learning_rate, options.label_smoothing)
        history = head.fit(
            LabelledBatches(pooled_train, train_labels, options.batch_size, shuffle=True, seed=options.seed),
            validation_data=LabelledBatches(pooled_validation, validation_labels, options.batch_size, shuffle=False),
            epochs=options.epochs,
            callbacks=_callbacks(run_dir, None, options.patience),
            verbose=verbose,
        )
        epochs_run = len(history.epoch)
        # Phase 2: top blocks and head together, slowly. Phase 1's model stays the saved one unless
        # an epoch of phase 2 beats its validation loss.
        compile_classifier(model, options.fine_tune_lr, options.label_smoothing)
        model.save(best_path)
        history = model.fit(
            train,
            validation_data=validation,
            initial_epoch=epochs_run,
            epochs=epochs_run + options.fine_tune_epochs,
            callbacks=_callbacks(run_dir, best_path, options.patience, min(history.history["val_loss"])),
            verbose=verbose,
        )
        fine_tune_epochs_run = len(history.epoch)
        epochs_run += fine_tune_epochs_run
    seconds = time.perf_counter() - started
    final = keras.saving.load_model(best_path, compile=False) if best_path.is_file() else model
    save_model_without_optimizer(final, run_dir / MODEL_FILE)
    best_path.unlink(missing_ok=True)
    plot_history(run_dir / HISTORY_FILE, run_dir / CURVES_FILE)
    compile_classifier(final, options.learning_rate, options.label_smoothing)
    loss, accuracy = final.evaluate(validation, verbose=0)
    return ClassifierTrainingResult(
        run_dir,
        epochs_run,
        float(loss),
        float(accuracy),
        seconds,
        len(train_ids),
        len(augmented_ids),
        len(validation_ids),
        device,
        folder.empty_classes,
        originals.failed,
        fine_tune_epochs_run,
    )
