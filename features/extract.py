"""The extraction loop: decode images in parallel, encode them in batches, flush to the store.

Resumable (ids already in the store are skipped) and interrupt-safe: a pickle store is replaced
atomically after each chunk, a sharded store gains one finished shard at a time, so a kill loses at
most the chunk or shard in progress.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.encoders import build_encoder, get_encoder_spec
from features.images import ImageDecodeError, load_image
from features.shards import DEFAULT_SHARD_SIZE, ShardWriter, is_sharded_store
from features.store import (
    FeatureStore,
    FeatureStoreError,
    merge_spatial_shards,
    spatial_path,
    write_spatial_shard,
)

STORE_FORMATS = ("auto", "pickle", "shards")
PICKLE_MAX_IMAGES = 20_000  # `auto`: a pickle store up to this many images (rewritten whole per flush), shards above


@dataclass
class ExtractionReport:
    """What an extraction run did."""

    store_path: Path
    extracted: int = 0
    already_present: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # image id -> reason
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


Augment = Callable[[str, np.ndarray], np.ndarray]  # (image id, pixels) -> pixels


def _decode(
    path: Path,
    size: int,
    image_id: str = "",
    augment: Augment | None = None,
) -> np.ndarray | ImageDecodeError:
    try:
        pixels = load_image(path, size)
    except ImageDecodeError as error:
        return error
    return augment(image_id, pixels) if augment is not None else pixels


def decoded_batches(
    items: list[tuple[str, Path]],
    size: int,
    batch_size: int,
    workers: int,
    prefetch: int = 2,
    augment: Augment | None = None,
) -> Iterator[list[tuple[str, np.ndarray | ImageDecodeError]]]:
    """Yield batches of (id, pixels or error), decoding up to `prefetch` batches ahead in threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = (items[i : i + batch_size] for i in range(0, len(items), batch_size))
        pending: deque[list[tuple[str, Future]]] = deque()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(
                    [(image_id, pool.submit(_decode, path, size, image_id, augment)) for image_id, path in chunk]
                )

        for _ in range(prefetch + 1):
            submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield [(image_id, future.result()) for image_id, future in batch]


def encoded_batches(
    model,
    spec,
    todo: list[tuple[str, Path]],
    batch_size: int,
    workers: int,
    report: ExtractionReport,
    progress: bool,
    desc: str,
    augment: Augment | None = None,
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Yield (ids, the model's outputs for them) batch by batch for the images of `todo`.

    Images are decoded ahead in threads (`decoded_batches`), preprocessed with `spec`, and encoded with
    `predict_on_batch` on batches padded to `batch_size`, so the compiled predict function is traced
    once. The outputs come back as a list, one array per model output, cut to the batch's readable
    images. Unreadable images go to `report.failed`; encoded ones count in `report.extracted`.
    """
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=not progress)
    try:
        for batch in decoded_batches(todo, spec.input_size, batch_size, workers, augment=augment):
            good = [(image_id, pixels) for image_id, pixels in batch if isinstance(pixels, np.ndarray)]
            report.failed.update({i: str(e) for i, e in batch if isinstance(e, ImageDecodeError)})
            if good:
                outputs = encode_batch(model, spec, [pixels for _, pixels in good], batch_size)
                report.extracted += len(good)
                yield [image_id for image_id, _ in good], outputs
            bar.update(len(batch))
    finally:
        bar.close()


def encode_batch(model, spec, pixels: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Return the model's outputs (one array per output, one row per image) for decoded `pixels`.

    The images are preprocessed with `spec` and padded with zeros to `batch_size` rows, so the compiled
    predict function is traced once and an image's vector does not depend on its batch.
    """
    images = spec.preprocess(np.stack(pixels))
    padded = np.zeros((batch_size, *images.shape[1:]), dtype=np.float32)
    padded[: len(images)] = images
    outputs = model.predict_on_batch(padded)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(output)[: len(pixels)] for output in outputs]


def _weights_label(weights: str | Path | None) -> str:
    return "none" if weights in (None, "none") else str(weights)


def store_metadata(encoder: str, weights: str | Path | None, spatial: bool) -> dict:
    """Return what a feature store records about the features in it: the encoder's spec, weights, spatial."""
    return {**get_encoder_spec(encoder).metadata(), "weights": _weights_label(weights), "spatial": spatial}


def extract_features(
    sources: dict[str, Path],
    out: str | Path,
    encoder: str = "efficientnet_lite0",
    weights: str | Path | None = "imagenet",
    batch_size: int = 32,
    spatial: bool = False,
    flush_every: int = 512,
    workers: int | None = None,
    progress: bool = True,
    augment: Augment | None = None,
    store_format: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExtractionReport:
    """Encode every image in `sources` ({image_id: path}) not yet in the store at `out`.

    `augment(image_id, pixels)`, if given, transforms each decoded image before encoding (training-time
    variants named in the id, such as the classifier's augmentations). `store_format` "auto" writes a
    sharded store (`shard_size` images a shard) when `out` is a folder or has no suffix, else a pickle.
    """
    out = Path(out)
    spec = get_encoder_spec(encoder)
    metadata = store_metadata(encoder, weights, spatial)
    writer = open_writer(out, metadata, choose_store_format(out, store_format, len(sources)), flush_every, shard_size)
    report = ExtractionReport(out)
    done = writer.done
    todo = [(image_id, Path(path)) for image_id, path in sorted(sources.items()) if image_id not in done]
    report.already_present = len(sources) - len(todo)
    if not todo:
        return report
    model = build_encoder(encoder, weights, spatial=spatial)
    started = time.perf_counter()
    batches = encoded_batches(
        model, spec, todo, batch_size, workers or os.cpu_count() or 2, report, progress, f"extract {encoder}", augment
    )
    try:
        with closing(batches):
            for ids, outputs in batches:
                writer.add(ids, outputs[0], outputs[1] if spatial else None)
    except KeyboardInterrupt:
        writer.flush()  # keep the finished work; the caller reports the interruption
        raise
    writer.finish()
    report.seconds = time.perf_counter() - started
    return report


def choose_store_format(out: Path | None, requested: str, images: int) -> str:
    """Return "pickle" or "shards": as asked, else from `out` (a folder or no suffix: shards), else by size."""
    if requested not in STORE_FORMATS:
        raise FeatureStoreError(f"unknown store format {requested!r}; choose one of {', '.join(STORE_FORMATS)}")
    if requested != "auto":
        return requested
    if out is not None:
        return "shards" if is_sharded_store(out) else "pickle"
    return "pickle" if images <= PICKLE_MAX_IMAGES else "shards"


def open_writer(out: Path, metadata: dict, store_format: str, flush_every: int, shard_size: int):
    """Return what adds encoded images to the store at `out`: `done` (ids there), `add`, `flush`, `finish`."""
    if store_format == "shards":
        if out.is_file():
            raise FeatureStoreError(f"{out}: a pickle store is there; --store shards needs a folder (another --out)")
        return ShardWriter(out, metadata, shard_size)
    if out.is_dir():
        raise FeatureStoreError(
            f"{out}: a folder is there; a pickle store is a file (another --out, or --store shards)"
        )
    return _StoreWriter(open_store(out, metadata), out, bool(metadata["spatial"]), flush_every)


def open_store(out: Path, metadata: dict) -> FeatureStore:
    """Return the store at `out` to add to (refused if another encoder made it), or a new one."""
    if not out.exists():
        return FeatureStore(metadata)
    store = FeatureStore.load(out)
    for key in ("encoder", "weights", "dim", "spatial"):
        if store.metadata.get(key) != metadata[key]:
            raise FeatureStoreError(
                f"{out}: existing store has {key}={store.metadata.get(key)!r}, this run {metadata[key]!r}; "
                "choose another --out to keep both"
            )
    return store


class _StoreWriter:
    """Adds encoded batches to a store and saves it (and a spatial-map shard) every `flush_every` images."""

    def __init__(self, store: FeatureStore, out: Path, spatial: bool, flush_every: int):
        self.store, self.out, self.spatial, self.flush_every = store, out, spatial, flush_every
        self.shard_folder = out.with_name(out.stem + ".spatial.parts")
        self.pending_ids: list[str] = []
        self.pending_maps: list[np.ndarray] = []

    @property
    def done(self) -> set[str]:
        return set(self.store.features)

    def add(self, ids: list[str], vectors: np.ndarray, maps: np.ndarray | None = None) -> None:
        for image_id, vector in zip(ids, vectors.astype(np.float32), strict=True):
            self.store.features[image_id] = vector
            self.pending_ids.append(image_id)
        if self.spatial:
            self.pending_maps.append(maps.astype(np.float16))
        if len(self.pending_ids) >= self.flush_every:
            self.flush()

    def finish(self) -> None:
        self.flush()
        if self.spatial:
            merge_spatial_shards(spatial_path(self.out), self.shard_folder, set(self.store.features))

    def flush(self) -> None:
        if not self.pending_ids:
            return
        if self.spatial:
            shard = self.shard_folder / f"part-{time.time_ns()}.h5"
            write_spatial_shard(shard, self.pending_ids, np.concatenate(self.pending_maps))
        self.store.save(self.out)
        self.pending_ids.clear()
        self.pending_maps.clear()
