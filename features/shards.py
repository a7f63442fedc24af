"""The sharded feature store: a folder of TFRecord shards and a small versioned manifest.

    STORE/manifest.json          format, version, metadata (encoder, preprocessing, weights, dims),
                                 the vector dtype, and each finished shard with its image count and size
    STORE/shard-00000.tfrecord   one `tf.train.Example` per image: `id`, `vector` (raw little-endian
                                 float16 or float32 bytes), `map` (float16, spatial stores only)
    STORE/shard-00000.ids.json   the shard's image ids, in record order (read without opening a shard)

A shard is written once, to a temporary file renamed into place, then its ids, then the manifest: a
shard exists for readers only once the manifest lists it, so a killed extraction leaves the finished
shards and nothing half-written, and the next run goes on from them. Writing an image costs the same
however many the store holds (the manifest grows by one short entry per shard). Readers check every
listed shard's size against the manifest when they open the store, and a record that does not parse
stops the read with `FeatureStoreError`: a store is served whole or not at all.

Pooled vectors are float16 by default: on the Flickr8k dev split, the shipped model's loss moves by
5e-7 and 997 of 1000 beam-3 captions are unchanged (BENCHMARKS.md); conversions keep float32 unless
every vector is exactly a float16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from features.store import FeatureStoreError, StoreFacts, atomic_write_bytes, read_versioned_json

MANIFEST_FILE = "manifest.json"
SHARDS_FORMAT = "captioning-feature-shards"
SHARDS_VERSION = 1
DEFAULT_SHARD_SIZE = 1024  # images per shard: COCO's 123k images make 121 shards, for up to 121 workers
VECTOR_DTYPES = ("float16", "float32")
MAP_DTYPE = "float16"
PARSE_BATCH = 256  # records parsed together (tf.io.parse_example on a batch is far faster than one by one)
INTERLEAVE = 4  # shards read at once
SHUFFLE_BYTES = 256 << 20  # features a stream's shuffle buffer holds at most (spatial maps are big)


@dataclass
class ShardInfo:
    """One finished shard as the manifest lists it."""

    file: str
    ids: str
    images: int
    bytes: int


def is_sharded_store(path: str | Path) -> bool:
    """Return whether `path` is (or is meant to be) a sharded store: a folder, or a path without a suffix."""
    path = Path(path)
    return path.is_dir() or (not path.exists() and path.suffix == "")


def _tensorflow():
    import tensorflow as tf

    return tf


class ShardedStore(StoreFacts):
    """Read access to a sharded store: the same questions as the pickle store, answered by streaming."""

    in_memory = False

    def __init__(self, path: Path, manifest: dict, shard_ids: list[list[str]]):
        self.path, self.manifest = path, manifest
        self.metadata: dict = manifest["metadata"]
        self.vector_dtype: str = manifest["vector_dtype"]
        self.shards = [ShardInfo(**entry) for entry in manifest["shards"]]
        self.shard_ids = shard_ids
        self._ids = {image_id for ids in shard_ids for image_id in ids}

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        return tuple(self.metadata["spatial_shape"]) if self.metadata.get("spatial") else None

    def __len__(self) -> int:
        return len(self._ids)

    def image_ids(self, spatial: bool = False) -> set[str]:
        """Return the ids with a vector (every id has its map too in a spatial store)."""
        if spatial:
            self.require_spatial()
        return set(self._ids)

    def require_spatial(self) -> None:
        if self.spatial_shape is None:
            raise FeatureStoreError(f"{self.path}: no spatial maps (extract with extract_features.py --spatial)")

    @classmethod
    def open(cls, path: str | Path) -> ShardedStore:
        """Return the store at `path` after checking its manifest, every shard's size and its id list."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FeatureStoreError(
                f"{path}: no sharded feature store there (no {MANIFEST_FILE}; run extract_features.py)"
            )
        manifest = read_versioned_json(
            manifest_path, SHARDS_FORMAT, SHARDS_VERSION, "sharded feature store manifest", FeatureStoreError
        )
        check_manifest(manifest_path, manifest)
        shard_ids = [_read_shard_ids(path, ShardInfo(**entry)) for entry in manifest["shards"]]
        seen: set[str] = set()
        for info, ids in zip(manifest["shards"], shard_ids, strict=True):
            if seen.intersection(ids):
                raise FeatureStoreError(f"{path / info['ids']}: an image id already in an earlier shard")
            seen.update(ids)
        return cls(path, manifest, shard_ids)

    def shard_paths(self, ids: Collection[str] | None = None, worker: int = 0, workers: int = 1) -> list[Path]:
        """Return worker `worker` of `workers`'s share of the shards holding any of `ids` (all: None)."""
        if workers > len(self.shards):
            raise FeatureStoreError(
                f"{self.path}: {len(self.shards)} shard(s) cannot be split among {workers} workers; extract again "
                f"with --shard-size {max(1, len(self) // workers)} or less"
            )
        if not 0 <= worker < workers:
            raise FeatureStoreError(f"worker {worker} is not one of 0 .. {workers - 1}")
        mine = list(zip(self.shards, self.shard_ids, strict=True))[worker::workers]
        wanted = None if ids is None else set(ids)
        return [self.path / info.file for info, held in mine if wanted is None or not wanted.isdisjoint(held)]

    def records(
        self,
        ids: Collection[str] | None = None,
        spatial: bool = False,
        shuffle_seed: int | None = None,
        worker: int = 0,
        workers: int = 1,
    ):
        """Return a `tf.data.Dataset` of parsed record batches {"id", "image" (float32), "regions" (float16,
        spatial)} from the shards holding `ids`, read `INTERLEAVE` at a time; their order reshuffled
        each pass when `shuffle_seed` is given. Records of ids not asked for are in the batches too."""
        tf = _tensorflow()
        if spatial:
            self.require_spatial()
        files = [str(p) for p in self.shard_paths(ids, worker, workers)]
        names = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
        if shuffle_seed is not None and files:
            names = names.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
        records = names.interleave(
            tf.data.TFRecordDataset,
            cycle_length=max(1, min(INTERLEAVE, len(files))),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return records.batch(PARSE_BATCH).map(
            lambda serialized: self._parse(serialized, spatial, tf), num_parallel_calls=tf.data.AUTOTUNE
        )

    def _parse(self, serialized, spatial: bool, tf):
        spec = {"id": tf.io.FixedLenFeature([], tf.string), "vector": tf.io.FixedLenFeature([], tf.string)}
        if spatial:
            spec["map"] = tf.io.FixedLenFeature([], tf.string)
        parsed = tf.io.parse_example(serialized, spec)
        vectors = tf.io.decode_raw(parsed["vector"], tf.as_dtype(self.vector_dtype))
        out = {"id": parsed["id"], "image": tf.reshape(tf.cast(vectors, tf.float32), [-1, self.dim])}
        if spatial:
            maps = tf.io.decode_raw(parsed["map"], tf.float16)
            out["regions"] = tf.reshape(maps, [-1, *self.spatial_shape])
        return out

    def chunks(
        self, ids: list[str], size: int, spatial: bool = False, shuffle_seed: int | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield (ids, float32 vectors or maps) for every id of `ids`, `size` at a time, in the order the
        shards hold them (shuffled through a buffer of a few batches when `shuffle_seed` is given)."""
        wanted, key, done = set(ids), "regions" if spatial else "image", 0
        buffer_ids: list[str] = []
        buffer_rows: list[np.ndarray] = []
        rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        for batch in self._read(self.records(wanted, spatial, shuffle_seed)):
            keep = [n for n, image_id in enumerate(batch["id"]) if image_id.decode() in wanted]
            buffer_ids += [batch["id"][n].decode() for n in keep]
            buffer_rows += list(batch[key][keep].astype(np.float32))
            while len(buffer_ids) >= (4 * size if rng is not None else size):
                done += size
                yield _take(buffer_ids, buffer_rows, size, rng)
        while buffer_ids:
            done += min(size, len(buffer_ids))
            yield _take(buffer_ids, buffer_rows, size, rng)
        if done != len(wanted):
            raise FeatureStoreError(
                f"{self.path}: {len(wanted) - done} of the {len(wanted)} images asked for are not in it"
            )

    def matrix(self, ids: list[str]) -> np.ndarray:
        """Return the vectors of `ids`, in that order, as float32 (len(ids), dim)."""
        return self._gather(ids, spatial=False)

    def maps(self, ids: list[str]) -> np.ndarray:
        """Return the spatial maps of `ids`, in that order, as float32 (len(ids), H, W, C)."""
        return self._gather(ids, spatial=True)

    def _gather(self, ids: list[str], spatial: bool) -> np.ndarray:
        missing = [i for i in ids if i not in self._ids]
        if missing:
            raise FeatureStoreError(f"{self.path}: no features for {len(missing)} image(s), e.g. {missing[0]!r}")
        rows: dict[str, list[int]] = {}
        for row, image_id in enumerate(ids):
            rows.setdefault(image_id, []).append(row)
        shape = self.spatial_shape if spatial else (self.dim,)
        out = np.empty((len(ids), *shape), dtype=np.float32)
        for chunk_ids, values in self.chunks(list(rows), PARSE_BATCH, spatial):
            for image_id, value in zip(chunk_ids, values, strict=True):
                out[rows[image_id]] = value
        return out

    def _read(self, dataset) -> Iterator[dict]:
        """Iterate `dataset` as numpy, turning a corrupt or malformed shard into one FeatureStoreError."""
        tf = _tensorflow()
        try:
            yield from dataset.as_numpy_iterator()
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
            raise shard_error(self.path, error) from None

    def close(self) -> None:
        """Nothing stays open between reads."""


def shuffle_buffer_size(store: ShardedStore, spatial: bool, batch_size: int, most: int) -> int:
    """Return a stream's shuffle buffer in samples: `most`, fewer when their features would pass
    `SHUFFLE_BYTES` (maps stay float16 until batched, vectors are float32), never under 4 batches."""
    sample_bytes = int(np.prod(store.spatial_shape)) * 2 if spatial else store.dim * 4
    return max(4 * batch_size, min(most, SHUFFLE_BYTES // sample_bytes))


SHARD_READ_MARKERS = ("parse", "decoderaw", "example", "record", "reshape")  # TF's words for a bad record


def is_shard_read_error(error: Exception) -> bool:
    """Return whether a TensorFlow error from a fit over shards came from reading them: data loss, or a
    record that did not parse or decode (not any invalid argument elsewhere in the model)."""
    tf = _tensorflow()
    if isinstance(error, tf.errors.DataLossError):
        return True
    message = str(getattr(error, "message", error)).lower()
    return isinstance(error, tf.errors.InvalidArgumentError) and any(m in message for m in SHARD_READ_MARKERS)


def shard_error(path: Path, error: Exception) -> FeatureStoreError:
    """Return the one-line error for a shard that TensorFlow could not read or parse."""
    detail = str(getattr(error, "message", error)).strip().splitlines()[0][:200]
    return FeatureStoreError(f"{path}: a shard is corrupt or malformed ({detail}); extract it again")


@contextmanager
def reading_shards(path: Path | None) -> Iterator[None]:
    """Turn a shard that TensorFlow cannot read or parse, inside the block, into one FeatureStoreError
    naming the store at `path` (None: nothing streams from shards; errors pass unchanged)."""
    tf = _tensorflow()
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        if path is None or not is_shard_read_error(error):
            raise
        raise shard_error(path, error) from None


def _take(ids: list[str], rows: list[np.ndarray], size: int, rng) -> tuple[list[str], np.ndarray]:
    """Remove and return `size` entries from the buffers: the first ones, or random ones given `rng`."""
    if rng is not None and len(ids) > 1:
        order = rng.permutation(len(ids))
        ids[:], rows[:] = [ids[i] for i in order], [rows[i] for i in order]
    chosen_ids, chosen = ids[:size], np.stack(rows[:size])
    del ids[:size], rows[:size]
    return chosen_ids, chosen


def check_manifest(path: Path, manifest: dict) -> None:
    """Raise FeatureStoreError naming `path` if the manifest's fields are missing or of the wrong kind."""
    metadata, shards = manifest.get("metadata"), manifest.get("shards")
    if not (isinstance(metadata, dict) and isinstance(metadata.get("dim"), int) and "encoder" in metadata):
        raise FeatureStoreError(f"{path}: malformed manifest (metadata with encoder and dim missing)")
    if manifest.get("vector_dtype") not in VECTOR_DTYPES:
        raise FeatureStoreError(f"{path}: malformed manifest (vector_dtype must be one of {', '.join(VECTOR_DTYPES)})")
    if metadata.get("spatial") and not isinstance(metadata.get("spatial_shape"), list):
        raise FeatureStoreError(f"{path}: malformed manifest (a spatial store without spatial_shape)")
    if not isinstance(shards, list):
        raise FeatureStoreError(f"{path}: malformed manifest (no shards list)")
    for number, entry in enumerate(shards):
        fields = {"file": str, "ids": str, "images": int, "bytes": int}
        if not (isinstance(entry, dict) and set(entry) == set(fields)) or not all(
            isinstance(entry[k], kind) for k, kind in fields.items()
        ):
            raise FeatureStoreError(f"{path}: malformed manifest (shards[{number}] needs file, ids, images, bytes)")
        if any(Path(entry[k]).name != entry[k] or entry[k].startswith(".") for k in ("file", "ids")):
            raise FeatureStoreError(f"{path}: shards[{number}] names a file outside the store folder")


def _read_shard_ids(folder: Path, info: ShardInfo) -> list[str]:
    """Return a shard's ids after checking that the shard is there, whole, and holds that many images."""
    shard = folder / info.file
    if not shard.is_file():
        raise FeatureStoreError(f"{shard}: shard listed in the manifest is missing; extract it again")
    if shard.stat().st_size != info.bytes:
        raise FeatureStoreError(
            f"{shard}: {shard.stat().st_size} bytes, the manifest says {info.bytes} (truncated or replaced); "
            "extract it again"
        )
    try:
        ids = json.loads((folder / info.ids).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureStoreError(f"{folder / info.ids}: unreadable shard id list ({error})") from None
    if not (isinstance(ids, list) and len(ids) == info.images and all(isinstance(i, str) for i in ids)):
        raise FeatureStoreError(f"{folder / info.ids}: expected a list of {info.images} image ids")
    return ids


def serialize_example(image_id: str, vector: np.ndarray, regions: np.ndarray | None = None) -> bytes:
    """Return one image's `tf.train.Example`, serialized; `vector` and `regions` already in their dtypes."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def raw(data: bytes):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[data]))

    feature = {
        "id": raw(image_id.encode("utf-8")),
        "vector": raw(vector.astype(vector.dtype.newbyteorder("<")).tobytes()),
    }
    if regions is not None:
        feature["map"] = raw(regions.astype("<f2").tobytes())
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def shard_number(name: str) -> int:
    """Return the number in a shard's file name ("shard-00012.tfrecord" -> 12)."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


def write_shard(folder: Path, number: int, records: list[tuple[str, np.ndarray, np.ndarray | None]]) -> ShardInfo:
    """Write `records` (id, vector, map or None; already in their dtypes) as shard `number` of the store at
    `folder`: the TFRecord file through a temporary file and `os.replace`, then its id list. Return its entry.

    The manifest is not touched: the shard exists for readers once `ShardWriter.add_shards` lists it.
    """
    tf = _tensorflow()
    info = ShardInfo(f"shard-{number:05d}.tfrecord", f"shard-{number:05d}.ids.json", len(records), 0)
    temporary = folder / f".{info.file}.{os.getpid()}.tmp"
    try:
        with tf.io.TFRecordWriter(str(temporary)) as writer:
            for image_id, vector, regions in records:
                writer.write(serialize_example(image_id, vector, regions))
        _fsync(temporary)
        info.bytes = temporary.stat().st_size
        os.replace(temporary, folder / info.file)
    finally:
        temporary.unlink(missing_ok=True)
    atomic_write_bytes(folder / info.ids, json.dumps([image_id for image_id, _, _ in records]).encode("utf-8"))
    return info


def finished_shard(folder: Path, number: int) -> tuple[ShardInfo, list[str]] | None:
    """Return (entry, ids) of shard `number` if `write_shard` finished it (its id list comes last), else None."""
    info = ShardInfo(f"shard-{number:05d}.tfrecord", f"shard-{number:05d}.ids.json", 0, 0)
    if not ((folder / info.ids).is_file() and (folder / info.file).is_file()):
        return None
    ids = json.loads((folder / info.ids).read_text(encoding="utf-8"))
    info.images, info.bytes = len(ids), (folder / info.file).stat().st_size
    return info, ids


class ShardWriter:
    """Adds encoded images to a sharded store, writing a shard whenever `shard_size` images are waiting.

    Opening one checks an existing store against `metadata` (`done`: the ids it holds) and removes the
    files a killed run left unlisted; `add_shards` lists shards written elsewhere (by Beam workers).
    """

    def __init__(self, path: str | Path, metadata: dict, shard_size: int = DEFAULT_SHARD_SIZE, vector_dtype="float16"):
        if shard_size < 1:
            raise FeatureStoreError("the shard size must be at least 1 image")
        self.path, self.shard_size = Path(path), shard_size
        if (self.path / MANIFEST_FILE).is_file():
            store = ShardedStore.open(self.path)
            check_same_features(self.path, store.metadata, metadata)
            self.manifest, self.done = store.manifest, store.image_ids()
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise FeatureStoreError(f"{self.path}: exists and is not a sharded feature store; choose another --out")
            self.manifest = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "metadata": dict(metadata),
                             "vector_dtype": vector_dtype, "shard_size": shard_size, "shards": []}  # fmt: skip
            self.done = set()
        self.spatial = bool(self.manifest["metadata"].get("spatial"))
        self.pending: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MANIFEST_FILE).is_file():
            self._write_manifest()  # the folder is a store (of no shards) from now: a killed first run resumes
        self._remove_unlisted()

    def _remove_unlisted(self) -> None:
        """Delete shard files a killed run left behind: never listed in the manifest, never read."""
        listed = {name for info in self.manifest["shards"] for name in (info["file"], info["ids"])}
        for leftover in self.path.glob("*shard-*"):
            if leftover.name not in listed:
                leftover.unlink()

    @property
    def next_number(self) -> int:
        """Return the number of the next new shard: one past the highest listed (numbers may have gaps)."""
        return 1 + max((shard_number(info["file"]) for info in self.manifest["shards"]), default=-1)

    def add(self, ids: list[str], vectors: np.ndarray, maps: np.ndarray | None = None) -> None:
        vectors = np.asarray(vectors).astype(self.manifest["vector_dtype"])
        maps = None if maps is None else np.asarray(maps).astype(MAP_DTYPE)
        for n, image_id in enumerate(ids):
            self.pending.append((image_id, vectors[n], None if maps is None else maps[n]))
            if len(self.pending) >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        """Write the images waiting as one shard (fewer than `shard_size` at the end or on Ctrl-C)."""
        if not self.pending:
            return
        info = write_shard(self.path, self.next_number, self.pending)
        self.add_shards([(info, [image_id for image_id, _, _ in self.pending])])
        self.pending.clear()

    def add_shards(self, written: list[tuple[ShardInfo, list[str]]]) -> None:
        """List finished shards (entry, ids) in the manifest, rewritten once atomically: now readers see them."""
        if not written:
            return
        for info, ids in written:
            self.manifest["shards"].append(asdict(info))
            self.done.update(ids)
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["images"] = sum(entry["images"] for entry in self.manifest["shards"])
        atomic_write_bytes(self.path / MANIFEST_FILE, json.dumps(self.manifest, indent=1).encode("utf-8"))

    def finish(self) -> None:
        self.flush()


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def check_same_features(path: Path, existing: dict, wanted: dict) -> None:
    """Refuse to add features of another encoder, weights, size or kind to an existing store."""
    for key in ("encoder", "weights", "dim", "spatial"):
        if existing.get(key) != wanted.get(key):
            raise FeatureStoreError(
                f"{path}: existing store has {key}={existing.get(key)!r}, this run {wanted.get(key)!r}; "
                "choose another --out to keep both"
            )


def lossless_vector_dtype(vectors: np.ndarray) -> str:
    """Return "float16" if every value of `vectors` is exactly a float16, else "float32"."""
    return "float16" if np.array_equal(vectors.astype(np.float16).astype(np.float32), vectors) else "float32"


def pickle_to_shards(source: str | Path, target: str | Path, shard_size: int = DEFAULT_SHARD_SIZE) -> ShardedStore:
    """Write the pickle store at `source` (and its spatial maps) as a new sharded store at `target`.

    Vectors keep their exact values: float16 shards only when every vector is exactly a float16.
    """
    from features.store import FeatureStore

    store, target = FeatureStore.load(source), Path(target)
    if target.exists():
        raise FeatureStoreError(f"{target}: already exists; convert into a new folder")
    ids = sorted(store.features)
    vectors = store.matrix(ids) if ids else np.zeros((0, store.dim), np.float32)
    spatial = bool(store.metadata.get("spatial"))
    writer = ShardWriter(target, store.metadata, shard_size, lossless_vector_dtype(vectors))
    try:
        for start in range(0, len(ids), shard_size):
            chunk = ids[start : start + shard_size]
            writer.add(chunk, vectors[start : start + shard_size], store.maps(chunk) if spatial else None)
        writer.finish()
    finally:
        store.close()
    return ShardedStore.open(target)


def shards_to_pickle(source: str | Path, target: str | Path):
    """Write the sharded store at `source` as a new pickle store at `target` (maps: HDF5 beside it)."""
    from features.store import FeatureStore, spatial_path

    store, target = ShardedStore.open(source), Path(target)
    if target.exists():
        raise FeatureStoreError(f"{target}: already exists; convert into a new file")
    ids = [image_id for shard in store.shard_ids for image_id in shard]
    features: dict[str, np.ndarray] = {}
    for chunk_ids, vectors in store.chunks(ids, PARSE_BATCH):
        features.update(zip(chunk_ids, vectors, strict=True))
    if store.spatial_shape is not None:
        _write_maps_hdf5(spatial_path(target), store, ids)
    converted = FeatureStore(dict(store.metadata), features)
    converted.save(target)
    return FeatureStore.load(target)


def _write_maps_hdf5(path: Path, store: ShardedStore, ids: list[str]) -> None:
    """Write the store's maps of `ids` (in storage order) to an HDF5 map file, chunk by chunk, atomically."""
    import h5py

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(temporary, "w") as out:
            out.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
            maps = out.create_dataset("maps", shape=(len(ids), *store.spatial_shape), dtype=np.float16)
            row_of = {image_id: row for row, image_id in enumerate(ids)}
            for chunk_ids, values in store.chunks(ids, PARSE_BATCH, spatial=True):
                rows = np.array([row_of[image_id] for image_id in chunk_ids])
                order = np.argsort(rows)  # h5py writes to increasing rows only
                maps[list(rows[order])] = values[order].astype(np.float16)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def convert_store(source: str | Path, target: str | Path, shard_size: int = DEFAULT_SHARD_SIZE):
    """Convert a pickle store into a sharded one, or a sharded one into a pickle, by what `source` is."""
    source = Path(source)
    if not source.exists():
        raise FeatureStoreError(f"{source}: no feature store there")
    return shards_to_pickle(source, target) if source.is_dir() else pickle_to_shards(source, target, shard_size)
