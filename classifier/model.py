"""Image-classifier heads on encoder features, their run directory, and classifying photos.

dense: pooled vector (D,) -> Dropout -> Dense(units, relu) -> Dense(classes, softmax)   (units=0: no hidden layer)
gru:   spatial map (H, W, C) -> Reshape (H*W regions, C) -> Dropout -> GRU(rnn_units) -> Dense(classes, softmax)
An L2 penalty (`l2`), if set, applies to every kernel of the head.
fine-tuned (fine_tune_blocks = N > 0, dense head only): the model reads the activations that enter the
encoder's last N blocks and runs those blocks itself (classifier/finetune.py); photos go
through the frozen bottom of the encoder first.

RUN_DIR/model.keras    best head, or fine-tuned top + head (no optimizer state)
RUN_DIR/classes.json   class names in output order
RUN_DIR/config.json    task, encoder, weights, head, feature shape, classes, split seed, training options
                       (format "classifier-run"; runs written before it had its own format say
                       "captioning-run", version 1, with task "image-classifier", and still load)
RUN_DIR/split.json     the train and validation image ids
RUN_DIR/history.csv    per-epoch loss/accuracy; RUN_DIR/curves.png the same as a plot
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from classifier.activations import (
    CachedActivations,
    activation_cache_path,
    cache_activations,
    cached_ids,
    read_activations,
)
from classifier.streaming import LabelledPart, LabelledStream, stream_probabilities
from features.augment import AUGMENTATIONS, FLIP
from features.encoders import EncoderSpec, build_encoder, build_encoder_split, get_encoder_spec
from features.extract import ExtractionReport, choose_store_format, extract_features
from features.images import ImageDecodeError, load_image
from features.shards import ShardedStore, is_sharded_store, reading_shards
from features.store import FeatureStore, FeatureStoreError, SpatialMaps, open_feature_store, spatial_path
from models.rundir import CONFIG_FILE, MODEL_FILE, RunDirError, write_json

TASK = "image-classifier"
RUN_FORMAT, RUN_FORMAT_VERSION = "classifier-run", 1
# Classifier runs were first saved in the caption runs' format, told apart by their "task" alone.
LEGACY_RUN_FORMAT, LEGACY_RUN_VERSIONS = "captioning-run", (1,)
CLASSES_FILE, SPLIT_FILE = "classes.json", "split.json"
ENCODE_BATCH = 32
STORE_FOLDER = Path("features") / "store"
PREDICT_CHUNK = 512  # rows widened to float32 at a time when predicting from float16 maps
PREDICT_BATCH = 64  # images a batch when predicting from a sharded store


class ClassifierError(ValueError):
    """A classifier that cannot be built, trained or run with the data or run directory given."""


@dataclass
class ClassifierConfig:
    num_classes: int
    feature_dim: int  # pooled vector size, from the encoder
    spatial_shape: tuple[int, int, int]  # (H, W, C) of the spatial map, from the encoder
    head: str = "dense"  # dense | gru
    units: int = 256  # dense head: hidden layer width; 0 = no hidden layer (softmax on the features)
    rnn_units: int = 128  # gru head: GRU state size
    dropout: float = 0.5
    l2: float = 0.0  # weight of the L2 penalty on every kernel; 0 = none
    fine_tune_blocks: int = 0  # last MBConv blocks of the encoder trained with the head; 0 = frozen encoder

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.spatial_shape = tuple(config.spatial_shape)
        return config

    @property
    def needs_spatial(self) -> bool:
        return self.head == "gru"


def _penalty(config: ClassifierConfig) -> keras.regularizers.Regularizer | None:
    return keras.regularizers.L2(config.l2) if config.l2 else None


def build_dense_head(config: ClassifierConfig) -> keras.Model:
    """Return the dense head: pooled vectors (B, D) -> class probabilities (B, classes)."""
    features = keras.Input((config.feature_dim,), name="features")
    hidden = layers.Dropout(config.dropout, name="dropout")(features)
    if config.units:
        hidden = layers.Dense(config.units, activation="relu", kernel_regularizer=_penalty(config), name="hidden")(
            hidden
        )
    outputs = layers.Dense(
        config.num_classes, activation="softmax", kernel_regularizer=_penalty(config), name="classes"
    )(hidden)
    return keras.Model(features, outputs, name="dense_classifier")


def build_gru_head(config: ClassifierConfig) -> keras.Model:
    """Return the GRU head: spatial maps (B, H, W, C) read as H*W regions -> class probabilities."""
    height, width, channels = config.spatial_shape
    maps = keras.Input((height, width, channels), name="features")
    regions = layers.Reshape((height * width, channels), name="regions")(maps)
    regions = layers.Dropout(config.dropout, name="dropout")(regions)
    state = layers.GRU(
        config.rnn_units, kernel_regularizer=_penalty(config), recurrent_regularizer=_penalty(config), name="gru"
    )(regions)
    outputs = layers.Dense(
        config.num_classes, activation="softmax", kernel_regularizer=_penalty(config), name="classes"
    )(state)
    return keras.Model(maps, outputs, name="gru_classifier")


HEADS = {"dense": build_dense_head, "gru": build_gru_head}


def build_classifier(config: ClassifierConfig) -> keras.Model:
    """Return the head named by `config.head`."""
    if config.head not in HEADS:
        raise ClassifierError(f"unknown head {config.head!r}; choose one of {', '.join(HEADS)}")
    if config.num_classes < 2:
        raise ClassifierError(f"a classifier needs at least 2 classes, got {config.num_classes}")
    if config.units < 0 or config.rnn_units < 1:
        raise ClassifierError(f"units must be >= 0 and rnn_units >= 1, got {config.units} and {config.rnn_units}")
    if not 0 <= config.dropout < 1 or config.l2 < 0:
        raise ClassifierError(f"dropout must be in [0, 1) and l2 >= 0, got {config.dropout} and {config.l2}")
    if config.fine_tune_blocks < 0 or (config.fine_tune_blocks and config.head != "dense"):
        raise ClassifierError(
            f"fine-tuning the encoder takes a positive number of blocks and the dense head, "
            f"got {config.fine_tune_blocks} blocks and the {config.head} head"
        )
    return HEADS[config.head](config)


def classification_loss(label_smoothing: float = 0.0):
    """Return cross-entropy on class indices, with the one-hot targets smoothed by `label_smoothing`.

    Keras's sparse cross-entropy has no smoothing, so smoothed targets are built from the indices here
    and the batches keep serving plain class indices either way.
    """
    if not 0 <= label_smoothing < 1:
        raise ClassifierError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()

    def smoothed_cross_entropy(labels, probabilities):
        classes = ops.shape(probabilities)[-1]
        targets = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), classes)
        return keras.losses.categorical_crossentropy(targets, probabilities, label_smoothing=label_smoothing)

    return smoothed_cross_entropy


def compile_classifier(model: keras.Model, learning_rate: float, label_smoothing: float = 0.0) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=classification_loss(label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


# ---- features: extracted once through the feature store, read per head ----


def default_store_path(data_dir: str | Path, encoder: str, images: int) -> Path:
    """Return the default feature store of a class folder of `images` images:
    features/store/<parent>_<folder>_<encoder>.pkl, or a sharded store (the same name as a folder,
    streamed when training) above `PICKLE_MAX_IMAGES`, as extract_features.py chooses."""
    data_dir = Path(data_dir).resolve()
    name = STORE_FOLDER / f"{data_dir.parent.name}_{data_dir.name}_{encoder}"
    return name if choose_store_format(None, "auto", images) == "shards" else name.with_suffix(".pkl")


def augmented_store_path(store_path: str | Path) -> Path:
    """Return the store of augmented variants (`id#flip`, ...) beside the originals' store.

    Training reads the variants of its train images from it; test-time flipping, those of the images
    it scores. Variants are named by their image, so one store serves both without mixing them.
    """
    store_path = Path(store_path)
    if is_sharded_store(store_path):  # a folder: a suffix would make the variants' store a pickle
        return store_path.with_name(f"{store_path.name}_augmented")
    return store_path.with_name(f"{store_path.stem}.augmented{store_path.suffix}")


def ensure_features(
    sources: dict[str, Path],
    store_path: str | Path,
    encoder: str,
    weights: str | Path | None,
    needs_spatial: bool,
    batch_size: int = 32,
    progress: bool = True,
    augment=None,
) -> tuple[FeatureStore, ExtractionReport]:
    """Extract the images of `sources` missing from the store (resumable) and return the store.

    A new pickle store keeps the spatial maps too, so one extraction serves both heads; a new sharded
    store (a large folder) keeps them only for a head that reads them: they are 125 KB an image against
    2.6 KB for the vector (15 GB at COCO's size). An existing store keeps whatever it was made with.
    """
    store_path = Path(store_path)
    if store_path.exists():
        spatial = open_feature_store(store_path).metadata.get("spatial", False)
    else:
        spatial = needs_spatial or not is_sharded_store(store_path)
    if needs_spatial and not spatial:
        raise ClassifierError(
            f"{store_path}: this feature store has no spatial maps, which the gru head reads; "
            "pass another --features path to extract a new one"
        )
    report = extract_features(
        sources, store_path, encoder, weights, batch_size, spatial=spatial, progress=progress, augment=augment
    )
    return open_feature_store(store_path), report


def head_inputs(store: FeatureStore, store_path: str | Path, ids: list[str], needs_spatial: bool) -> np.ndarray:
    """Return what the head reads for `ids`: pooled vectors (float32), or spatial maps (float16).
    `store`: either kind of feature store (a sharded one is read in one pass over its shards)."""
    if not needs_spatial:
        return store.matrix(ids)
    if not store.in_memory:
        return store.maps(ids).astype(np.float16)
    maps = SpatialMaps(spatial_path(store_path))
    try:
        missing = [i for i in ids if i not in maps.index]
        if missing:
            raise FeatureStoreError(f"{maps.path}: no spatial map for {len(missing)} image(s), e.g. {missing[0]!r}")
        out = np.empty((len(ids), *maps.shape), dtype=np.float16)
        for start in range(0, len(ids), PREDICT_CHUNK):
            out[start : start + PREDICT_CHUNK] = maps.get(ids[start : start + PREDICT_CHUNK])
        return out
    finally:
        maps.close()


def predict_probabilities(model: keras.Model, inputs: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Return class probabilities (N, classes) for head inputs, widening float16 maps chunk by chunk."""
    if len(inputs) == 0:
        return np.zeros((0, model.output.shape[-1]), dtype=np.float32)
    chunks = [
        model.predict(inputs[start : start + PREDICT_CHUNK].astype(np.float32), batch_size=batch_size, verbose=0)
        for start in range(0, len(inputs), PREDICT_CHUNK)
    ]
    return np.concatenate(chunks).astype(np.float32)


@dataclass
class HeadInputs:
    """What a model reads, by image id, from the feature store or from the activation cache."""

    path: Path  # the feature store, or the activation cache of a fine-tuned model
    available: set[str]  # ids that can be read (readable images)
    failed: dict[str, str]  # image id -> why it could not be encoded
    read: Callable[[list[str]], np.ndarray | CachedActivations]  # ids -> vectors (float32), maps (float16), activations
    stream: ShardedStore | None = None  # a sharded feature store: read through tf.data, never into arrays
    spatial: bool = False  # the head reads spatial maps

    def part(self, labels: dict[str, int]) -> LabelledPart:
        """Return the images of `labels` ({id: class index}) as one part of a `LabelledStream`."""
        if self.stream is None:
            raise ClassifierError(f"{self.path}: not a sharded feature store, nothing to stream")
        return LabelledPart(self.stream, labels)

    def probabilities(self, model: keras.Model, ids: list[str]) -> np.ndarray:
        """Return the model's class probabilities (len(ids), classes) for `ids`, streamed from a sharded store."""
        if self.stream is None:
            return predict_probabilities(model, self.read(ids))
        stream = LabelledStream([self.part(dict.fromkeys(ids, 0))], PREDICT_BATCH, shuffle=False, spatial=self.spatial)
        with reading_shards(self.stream.path):
            return stream_probabilities(model, stream, ids)


def prepare_inputs(
    sources: dict[str, Path],
    store_path: str | Path,
    encoder: str,
    weights: str | Path | None,
    config: ClassifierConfig,
    progress: bool = True,
    augment=None,
) -> HeadInputs:
    """Encode the images of `sources` not yet cached and return a reader of the model's inputs.

    A frozen-encoder head reads the feature store at `store_path`; a fine-tuned model reads the
    activation cache beside it (`classifier.activations.activation_cache_path`).
    """
    if config.fine_tune_blocks:
        cache = activation_cache_path(store_path, encoder, config.fine_tune_blocks)
        report = cache_activations(
            sources, cache, encoder, weights, config.fine_tune_blocks, progress=progress, augment=augment
        )
        return HeadInputs(cache, cached_ids(cache), report.failed, lambda ids: read_activations(cache, ids))
    store, report = ensure_features(
        sources, store_path, encoder, weights, config.needs_spatial, progress=progress, augment=augment
    )
    return HeadInputs(
        Path(store_path),
        store.image_ids(),
        report.failed,
        lambda ids: head_inputs(store, store_path, ids, config.needs_spatial),
        stream=None if store.in_memory else store,
        spatial=config.needs_spatial,
    )


# ---- the run directory ----


@dataclass
class ClassifierRun:
    path: Path
    model: keras.Model
    classes: list[str]
    config: dict  # the whole config.json

    @property
    def model_config(self) -> ClassifierConfig:
        return ClassifierConfig.from_dict(self.config["model"])

    @property
    def encoder_spec(self) -> EncoderSpec:
        return get_encoder_spec(self.config["encoder"])

    def split(self) -> dict:
        """Return split.json: the train and validation ids the run was trained and selected on."""
        return _read_json(self.path / SPLIT_FILE)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path.parent}: incomplete classifier run, {path.name} missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path}: not valid JSON ({error})") from None


def write_classifier_config(run_dir: str | Path, config: dict) -> None:
    """Write the run's config.json, atomically, under the classifier runs' own format name and version."""
    kept = {k: v for k, v in config.items() if k not in ("format", "version")}
    write_json(Path(run_dir) / CONFIG_FILE, {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **kept})


def read_classifier_config(run_dir: str | Path) -> dict:
    """Return config.json of a classifier run: format "classifier-run", or the older "captioning-run" one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory (train one with classify.py train)")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: incomplete run directory, {CONFIG_FILE} missing")
    config = _read_json(path)
    name = config.get("format") if isinstance(config, dict) else None
    if name == RUN_FORMAT:
        readable = (RUN_FORMAT_VERSION,)
    elif name == LEGACY_RUN_FORMAT and config.get("task") == TASK:
        readable = LEGACY_RUN_VERSIONS
    else:
        raise RunDirError(f"{path}: not an image-classifier run (train one with classify.py train)")
    if config.get("version") not in readable:
        expected = " or ".join(str(v) for v in readable)
        raise RunDirError(f"{path}: {name} format version {config.get('version')}, expected {expected}")
    for key in ("encoder", "model"):
        if key not in config:
            raise RunDirError(f"{path}: {key!r} missing from the run config")
    return config


def _load_model(run_dir: Path) -> keras.Model:
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise RunDirError(f"{run_dir}: incomplete run directory, {MODEL_FILE} missing")
    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged archive
        raise RunDirError(f"{model_path}: cannot load the model ({type(error).__name__}: {str(error)[:120]})") from None


def load_classifier_run(run_dir: str | Path) -> ClassifierRun:
    """Return the run's model, classes and config, checking that they agree."""
    run_dir = Path(run_dir)
    config = read_classifier_config(run_dir)
    classes = _read_json(run_dir / CLASSES_FILE)
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise RunDirError(f"{run_dir / CLASSES_FILE}: expected a JSON list of class names")
    try:
        get_encoder_spec(config["encoder"])
        model_config = ClassifierConfig.from_dict(config["model"])
    except (TypeError, ValueError) as error:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {error}") from None
    model = _load_model(run_dir)
    if not len(classes) == model_config.num_classes == model.output.shape[-1]:
        raise RunDirError(
            f"{run_dir}: {CLASSES_FILE} has {len(classes)} classes, the model {model.output.shape[-1]}, "
            f"{CONFIG_FILE} {model_config.num_classes}"
        )
    return ClassifierRun(run_dir, model, classes, config)


# ---- classifying photos ----


@dataclass
class Classification:
    image: str
    label: str  # the most probable class
    probability: float
    probabilities: dict[str, float]  # every class, in the run's class order

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "class": self.label,
            "probability": round(self.probability, 4),
            "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
        }


def encode_pixels(encoder: keras.Model, spec: EncoderSpec, pixels: np.ndarray, spatial: bool) -> np.ndarray:
    """Return the head's input for (N, S, S, 3) pixels: pooled vectors, or spatial maps if `spatial`."""
    out = []
    for start in range(0, len(pixels), ENCODE_BATCH):
        chunk = spec.preprocess(pixels[start : start + ENCODE_BATCH])
        # A fixed batch shape: the compiled predict function is traced once.
        padded = np.zeros((ENCODE_BATCH, *chunk.shape[1:]), dtype=np.float32)
        padded[: len(chunk)] = chunk
        outputs = encoder.predict_on_batch(padded)
        out.append(np.asarray(outputs[1] if spatial else outputs, dtype=np.float32)[: len(chunk)])
    return np.concatenate(out)


def classify_files(
    run: str | Path | ClassifierRun,
    paths: list[str | Path],
    encoder_weights: str | Path | None = None,
    flip: bool = False,
) -> tuple[list[Classification], dict[str, str]]:
    """Return (a classification of each readable image, {path: reason} for the unreadable ones).

    Images are decoded with `load_image`, encoded with the run's encoder (for a fine-tuned run, its
    frozen bottom) in fixed batches, and classified in one `predict` call. With `flip`, each image's
    probabilities are the mean of its own and its mirror image's (test-time augmentation), both
    encoded in the same batches.
    """
    if not isinstance(run, ClassifierRun):
        run = load_classifier_run(run)
    spec, config = run.encoder_spec, run.model_config
    pixels, names, errors = [], [], {}
    for path in paths:
        try:
            pixels.append(load_image(path, spec.input_size))
            names.append(str(path))
        except ImageDecodeError as error:
            errors[str(path)] = str(error)
    if not pixels:
        return [], errors
    weights = encoder_weights or run.config.get("weights", "imagenet")
    if config.fine_tune_blocks:  # the frozen bottom here; the fine-tuned top is part of run.model
        encoder, _ = build_encoder_split(spec.name, weights, config.fine_tune_blocks)
    else:
        encoder = build_encoder(spec.name, weights, config.needs_spatial)
    pixels = np.stack(pixels)
    if flip:
        pixels = np.concatenate([pixels, np.stack([AUGMENTATIONS[FLIP](p) for p in pixels])])
    probabilities = predict_probabilities(run.model, encode_pixels(encoder, spec, pixels, config.needs_spatial))
    if flip:  # rows: the originals, then their mirrors
        probabilities = (probabilities[: len(names)] + probabilities[len(names) :]) / 2
    results = []
    for name, row in zip(names, probabilities, strict=True):
        best = int(np.argmax(row))
        results.append(
            Classification(
                name,
                run.classes[best],
                float(row[best]),
                {c: float(p) for c, p in zip(run.classes, row, strict=True)},
            )
        )
    return results, errors
