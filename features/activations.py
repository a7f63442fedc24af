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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.encoders import build_encoder_split, get_encoder_spec, split_point
from features.extract import Augment, ExtractionReport, _weights_label, decoded_batches
from features.images import ImageDecodeError
from features.store import FeatureStoreError, SpatialMaps, atomic_write_bytes, merge_spatial, write_spatial_shard

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
    if not todo:
        _merge_shards(cache_path)
        return report
    spec = get_encoder_spec(encoder)
    bottom, _ = build_encoder_split(encoder, weights, fine_tune_blocks)
    pending_ids: list[str] = []
    pending_maps: list[np.ndarray] = []

    def flush() -> None:
        if pending_ids:
            write_spatial_shard(
                _shard_folder(cache_path) / f"part-{time.time_ns()}.h5", pending_ids, np.concatenate(pending_maps)
            )
            pending_ids.clear()
            pending_maps.clear()

    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"cache {encoder} bottom", disable=not progress)
    try:
        for batch in decoded_batches(todo, spec.input_size, batch_size, os.cpu_count() or 2, augment=augment):
            good = [(image_id, pixels) for image_id, pixels in batch if isinstance(pixels, np.ndarray)]
            report.failed.update({i: str(e) for i, e in batch if isinstance(e, ImageDecodeError)})
            if good:
                images = spec.preprocess(np.stack([pixels for _, pixels in good]))
                padded = np.zeros((batch_size, *images.shape[1:]), dtype=np.float32)  # one traced shape
                padded[: len(images)] = images
                activations = np.asarray(bottom.predict_on_batch(padded), dtype=np.float16)[: len(good)]
                pending_ids.extend(image_id for image_id, _ in good)
                pending_maps.append(activations)
                report.extracted += len(good)
            bar.update(len(batch))
            if len(pending_ids) >= flush_every:
                flush()
    except KeyboardInterrupt:
        flush()
        raise
    finally:
        bar.close()
    flush()
    report.seconds = time.perf_counter() - started
    _merge_shards(cache_path)
    return report


def _merge_shards(cache_path: Path) -> None:
    shard_folder = _shard_folder(cache_path)
    shards = sorted(shard_folder.glob("part-*.h5")) if shard_folder.is_dir() else []
    if shards:
        merge_spatial(cache_path, ([cache_path] if cache_path.is_file() else []) + shards, cached_ids(cache_path))
        for shard in shards:
            shard.unlink()
    if shard_folder.is_dir():
        shard_folder.rmdir()


def read_activations(cache_path: str | Path, ids: list[str]) -> np.ndarray:
    """Return the cached activations of `ids` as float16 (len(ids), H, W, C)."""
    maps = SpatialMaps(cache_path)
    try:
        missing = [i for i in ids if i not in maps.index]
        if missing:
            raise FeatureStoreError(
                f"{maps.path}: no cached activation for {len(missing)} image(s), e.g. {missing[0]!r}"
            )
        out = np.empty((len(ids), *maps.shape), dtype=np.float16)
        for start in range(0, len(ids), 512):
            out[start : start + 512] = maps.get(ids[start : start + 512])
        return out
    finally:
        maps.close()
