"""The activation cache: what the frozen bottom of a split encoder makes of each image, computed once.

Fine-tuning the top blocks of an encoder re-runs only those blocks each epoch; the bottom's output
for every image (and every augmented variant) is stored, float16, in an HDF5 file beside the
feature store, in the spatial-map format (`ids`, `maps`). Resumable and interrupt-safe like the
feature extraction: work is flushed in shards and merged at the end.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from features.encoders import build_encoder_split, get_encoder_spec, split_point
from features.extract import Augment, ExtractionReport, _weights_label, encoded_batches
from features.store import (
    FeatureStoreError,
    SpatialMaps,
    atomic_write_bytes,
    merge_spatial_shards,
    write_spatial_shard,
)

ENCODE_BATCH = 32


def activation_cache_path(store_path: str | Path, encoder: str, fine_tune_blocks: int) -> Path:
    """Return the cache of a store's images at the split before the last `fine_tune_blocks` blocks."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}.block{split_point(encoder, fine_tune_blocks)}.h5")


def _shard_folder(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.stem + ".parts")


def cached_ids(cache_path: str | Path) -> set[str]:
    """Return the ids already in the cache or in the shards an interrupted run left."""
    cache_path = Path(cache_path)
    files = [cache_path] if cache_path.is_file() else []
    if _shard_folder(cache_path).is_dir():
        files += sorted(_shard_folder(cache_path).glob("part-*.h5"))
    ids: set[str] = set()
    for path in files:
        maps = SpatialMaps(path)
        try:
            ids.update(maps.index)
        finally:
            maps.close()
    return ids


def _check_or_write_description(cache_path: Path, description: dict) -> None:
    """Refuse a cache made by other weights or another split; describe a new one beside it."""
    sidecar = cache_path.with_name(cache_path.name + ".json")
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FeatureStoreError(f"{sidecar}: not valid JSON ({error})") from None
        if recorded != description:
            raise FeatureStoreError(
                f"{cache_path}: cached by {recorded}, this run needs {description}; pass another --features path"
            )
    else:
        atomic_write_bytes(sidecar, (json.dumps(description, indent=2, sort_keys=True) + "\n").encode())


def cache_activations(
    sources: dict[str, Path],
    cache_path: str | Path,
    encoder: str,
    weights: str | Path | None,
    fine_tune_blocks: int,
    batch_size: int = ENCODE_BATCH,
    flush_every: int = 512,
    progress: bool = True,
    augment: Augment | None = None,
) -> ExtractionReport:
    """Run the bottom of the split encoder over the images of `sources` not yet in the cache."""
    cache_path = Path(cache_path)
    first_block = split_point(encoder, fine_tune_blocks)
    description = {"encoder": encoder, "weights": _weights_label(weights), "first_block": first_block}
    _check_or_write_description(cache_path, description)
    report = ExtractionReport(cache_path)
    present = cached_ids(cache_path)
    todo = [(image_id, Path(path)) for image_id, path in sorted(sources.items()) if image_id not in present]
    report.already_present = len(sources) - len(todo)
    if todo:
        bottom, _ = build_encoder_split(encoder, weights, fine_tune_blocks)
        pending_ids: list[str] = []
        pending_maps: list[np.ndarray] = []

        def flush() -> None:
            if pending_ids:
                shard = _shard_folder(cache_path) / f"part-{time.time_ns()}.h5"
                write_spatial_shard(shard, pending_ids, np.concatenate(pending_maps))
                pending_ids.clear()
                pending_maps.clear()

        started = time.perf_counter()
        batches = encoded_batches(
            bottom,
            get_encoder_spec(encoder),
            todo,
            batch_size,
            os.cpu_count() or 2,
            report,
            progress,
            f"cache {encoder} bottom",
            augment,
        )
        try:
            with closing(batches):
                for ids, (activations,) in batches:
                    pending_ids.extend(ids)
                    present.update(ids)
                    pending_maps.append(activations.astype(np.float16))
                    if len(pending_ids) >= flush_every:
                        flush()
        except KeyboardInterrupt:
            flush()
            raise
        flush()
        report.seconds = time.perf_counter() - started
    merge_spatial_shards(cache_path, _shard_folder(cache_path), present)  # the cache's ids and the new ones
    return report


def read_activations(cache_path: str | Path, ids: list[str]) -> CachedActivations:
    """Return the cached activations of `ids` (float16, (len(ids), H, W, C)), read from the cache when indexed."""
    return CachedActivations([(Path(cache_path), list(ids))])


class CachedActivations:
    """Rows of activation caches, read from disk when indexed by a slice or row numbers (as
    `LabelledBatches` and `predict_probabilities` index them), so the cache is never all in memory.

    The rows are each part's ids in order, the parts one after the other (`+` joins two).
    """

    dtype = np.dtype(np.float16)

    def __init__(self, parts: list[tuple[Path, list[str]]]):
        self.parts = parts
        # kept open while the rows are read (an index per file, built once); closed when freed
        self._maps = {path: SpatialMaps(path) for path, _ in parts}
        for path, ids in parts:
            missing = [i for i in ids if i not in self._maps[path].index]
            if missing:
                raise FeatureStoreError(
                    f"{path}: no cached activation for {len(missing)} image(s), e.g. {missing[0]!r}"
                )
        self._ids = [(path, image_id) for path, ids in parts for image_id in ids]
        self.shape = (len(self._ids), *next(iter(self._maps.values())).shape)

    def __len__(self) -> int:
        return len(self._ids)

    def __add__(self, other: CachedActivations) -> CachedActivations:
        return CachedActivations(self.parts + other.parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:].astype(dtype or self.dtype)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.atleast_1d(np.arange(len(self))[index])
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float16)
        by_file: dict[Path, list[int]] = {}
        for n, row in enumerate(rows):
            by_file.setdefault(self._ids[row][0], []).append(n)
        for path, positions in by_file.items():
            out[positions] = self._maps[path].get([self._ids[rows[n]][1] for n in positions])
        return out
