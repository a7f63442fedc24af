"""The feature store: a pickle of {image_id: float32 vector} plus metadata, loaded safely.

Spatial maps (for attention decoders) live in an HDF5 file beside the store, float16, with
datasets `ids` (N,) and `maps` (N, H, W, C). h5py is imported only where maps are read or written:
the vocabulary and run files use this module's JSON helpers in the LiteRT runtime, which has no h5py.

Stores too big to hold in memory are sharded (`features.shards`); `open_feature_store` opens either,
and both answer the same questions: `metadata`, `dim`, `encoder`, `spatial_shape`,
`image_ids(spatial)`, `matrix(ids)`, `maps(ids)`, `chunks(ids, size, spatial, shuffle_seed)`, `close()`;
`in_memory` tells a trainer whether to index arrays or to stream.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "captioning-feature-store"
FORMAT_VERSION = 1
DEFAULT_STORE = Path("features") / "store" / "flickr8k_efficientnet_lite0.pkl"
MERGE_ROWS = 512  # spatial-map rows copied at a time when merging HDF5 files


class FeatureStoreError(ValueError):
    """A feature store that is missing, malformed, unsafe or made by another encoder."""


# The only globals a feature-store pickle may name: what numpy needs to rebuild arrays.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),  # numpy >= 2 with pickle protocol 5
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise FeatureStoreError(
            f"refusing to load {module}.{name}: a feature store may hold only dicts, strings, numbers and numpy arrays"
        )


def safe_loads(data: bytes) -> object:
    """Unpickle `data`, allowing nothing but builtin containers, numbers, strings and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except FeatureStoreError:
        raise
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise FeatureStoreError(f"unreadable pickle ({type(error).__name__}: {error})") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_versioned_json(
    path: Path, format_name: str, version: int | tuple[int, ...], what: str, error: type[Exception]
) -> dict:
    """Return the JSON object in `path` after checking its "format" and "version" (one, or any of several).

    A missing file raises FileNotFoundError (callers word that case themselves); anything else wrong
    raises `error` naming the file and, through `what`, the kind of file expected.
    """
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != format_name:
        raise error(f"{path}: not a {what}")
    versions = version if isinstance(version, tuple) else (version,)
    if payload.get("version") not in versions:
        expected = " or ".join(str(v) for v in versions)
        raise error(f"{path}: {what} format version {payload.get('version')}, expected {expected}")
    return payload


class StoreFacts:
    """What both stores (pickle and shards) read from their `metadata`: the vector size and the encoder."""

    metadata: dict

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def encoder(self) -> str:
        return str(self.metadata["encoder"])


@dataclass
class FeatureStore(StoreFacts):
    """Pooled image vectors by image id, and what made them; spatial maps from the HDF5 file beside it."""

    metadata: dict
    features: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from: its spatial maps are beside it
    _spatial: SpatialMaps | None = field(default=None, init=False, repr=False, compare=False)

    in_memory = True

    def matrix(self, ids: list[str]) -> np.ndarray:
        """Return the vectors of `ids` stacked as a float32 (len(ids), dim) array."""
        return np.stack([self.features[i] for i in ids]).astype(np.float32, copy=False)

    def spatial_maps(self) -> SpatialMaps:
        """Return the spatial maps beside the store (opened once), checked against its encoder."""
        if self._spatial is None:
            if self.path is None:
                raise FeatureStoreError("an unsaved feature store has no spatial maps")
            maps = SpatialMaps(spatial_path(self.path))
            expected = self.metadata.get("spatial_shape")
            if expected is not None and tuple(expected) != maps.shape:
                maps.close()
                raise FeatureStoreError(
                    f"{maps.path}: maps of shape {maps.shape}, but {self.encoder} gives {tuple(expected)}"
                )
            self._spatial = maps
        return self._spatial

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """Return the maps' (H, W, C), or None when there is no map file beside the store."""
        if self.path is None or not spatial_path(self.path).is_file():
            return None
        return self.spatial_maps().shape

    def require_spatial(self) -> None:
        """Raise FeatureStoreError unless spatial maps of this store's encoder are beside it."""
        self.spatial_maps()

    def image_ids(self, spatial: bool = False) -> set[str]:
        """Return the ids that have a vector (and a spatial map, when `spatial`)."""
        return set(self.features) & set(self.spatial_maps().index) if spatial else set(self.features)

    def maps(self, ids: list[str]) -> np.ndarray:
        """Return the spatial maps of `ids` as float32 (len(ids), H, W, C)."""
        return self.spatial_maps().get(ids)

    def chunks(
        self, ids: list[str], size: int, spatial: bool = False, shuffle_seed: int | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield (ids, float32 vectors or maps) for `ids`, `size` at a time, in the order given (a store in
        memory has no order of its own; `shuffle_seed` is for streaming stores and changes nothing here)."""
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            yield chunk, self.maps(chunk) if spatial else self.matrix(chunk)

    def close(self) -> None:
        if self._spatial is not None:
            self._spatial.close()
            self._spatial = None

    def save(self, path: str | Path) -> None:
        """Write the store atomically."""
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "metadata": dict(self.metadata),
            "features": self.features,
        }
        atomic_write_bytes(Path(path), pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStore:
        """Read a store through the restricted unpickler and check its structure."""
        path = Path(path)
        if not path.is_file():
            raise FeatureStoreError(f"{path}: no feature store there (run extract_features.py first)")
        try:
            payload = safe_loads(path.read_bytes())
        except FeatureStoreError as error:
            raise FeatureStoreError(f"{path}: {error}") from None
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT_NAME):
            raise FeatureStoreError(f"{path}: not a feature store written by extract_features.py")
        if payload.get("version") != FORMAT_VERSION:
            raise FeatureStoreError(
                f"{path}: feature store version {payload.get('version')}, expected {FORMAT_VERSION}"
            )
        metadata, features = payload.get("metadata"), payload.get("features")
        if not isinstance(metadata, dict) or not isinstance(features, dict) or "dim" not in metadata:
            raise FeatureStoreError(f"{path}: malformed feature store (metadata or features missing)")
        dim = int(metadata["dim"])
        for image_id, vector in features.items():
            if not (isinstance(image_id, str) and isinstance(vector, np.ndarray) and vector.shape == (dim,)):
                raise FeatureStoreError(f"{path}: entry {image_id!r:.60} is not a {dim}-d vector")
        return cls(metadata, features, path)


def spatial_path(store_path: str | Path) -> Path:
    """Return the HDF5 file that holds the spatial maps belonging to a store."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + ".spatial.h5")


def write_spatial_shard(path: Path, ids: list[str], maps: np.ndarray) -> None:
    """Write one chunk of spatial maps to its own HDF5 file atomically."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(temporary, "w") as handle:
            handle.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
            handle.create_dataset("maps", data=maps.astype(np.float16))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def merge_spatial_shards(target: Path, shard_folder: Path, keep_ids: set[str]) -> None:
    """Merge the map shards an extraction flushed into `shard_folder` into `target`, then remove them."""
    shards = sorted(shard_folder.glob("part-*.h5")) if shard_folder.is_dir() else []
    if shards:
        merge_spatial(target, ([target] if target.is_file() else []) + shards, keep_ids)
        for shard in shards:
            shard.unlink()
    if shard_folder.is_dir():
        shard_folder.rmdir()


def merge_spatial(target: Path, sources: list[Path], keep_ids: set[str]) -> None:
    """Combine HDF5 map files into `target` (atomically), keeping the first copy of each id in keep_ids.

    Rows are copied `MERGE_ROWS` at a time, so memory does not grow with the files (COCO's 7x7x1280
    float16 maps are about 15 GB)."""
    import h5py

    seen: dict[str, tuple[Path, int]] = {}
    shape = None
    for source in sources:
        with h5py.File(source, "r") as handle:
            shape = handle["maps"].shape[1:]
            for row, image_id in enumerate(handle["ids"].asstr()[:]):
                if image_id in keep_ids and image_id not in seen:
                    seen[image_id] = (source, row)
    if shape is None:
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(temporary, "w") as out:
            ids = list(seen)
            out.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
            maps = out.create_dataset("maps", shape=(len(ids), *shape), dtype=np.float16)
            by_source: dict[Path, list[tuple[int, int]]] = {}
            for index, image_id in enumerate(ids):
                source, row = seen[image_id]
                by_source.setdefault(source, []).append((row, index))
            for source, pairs in by_source.items():
                pairs.sort()  # h5py reads and writes rows given in increasing order
                with h5py.File(source, "r") as handle:
                    for start in range(0, len(pairs), MERGE_ROWS):  # a block at a time: never a whole file
                        block = pairs[start : start + MERGE_ROWS]
                        values = handle["maps"][[row for row, _ in block]]
                        indices = [index for _, index in block]
                        if indices == sorted(indices):
                            maps[indices] = values
                        else:
                            for index, value in zip(indices, values, strict=True):
                                maps[index] = value
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


class SpatialMaps:
    """Read access to a spatial-map HDF5 file by image id."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureStoreError(f"{self.path}: no spatial maps (run extract_features.py --spatial)")
        self._file = h5py.File(self.path, "r")
        self._maps = self._file["maps"]
        self.index = {image_id: row for row, image_id in enumerate(self._file["ids"].asstr()[:])}
        self.shape = tuple(self._maps.shape[1:])

    def get(self, ids: list[str]) -> np.ndarray:
        """Return the maps of `ids` as float32 (len(ids), H, W, C)."""
        rows = np.array([self.index[i] for i in ids])
        order = np.argsort(rows)
        unique_rows, inverse = np.unique(rows[order], return_inverse=True)
        block = self._maps[unique_rows]  # h5py needs increasing indices
        out = np.empty((len(ids), *self.shape), dtype=np.float32)
        out[order] = block[inverse]
        return out

    def close(self) -> None:
        self._file.close()


def open_feature_store(path: str | Path):
    """Return the feature store at `path`: a sharded store (a folder) or a pickle store (a file).

    Both answer the questions listed in this module's docstring; `FeatureStoreError` if neither is there.
    """
    from features.shards import ShardedStore

    path = Path(path)
    return ShardedStore.open(path) if path.is_dir() else FeatureStore.load(path)
