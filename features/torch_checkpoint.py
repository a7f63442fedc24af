"""Read a legacy (non-zip) PyTorch checkpoint into numpy arrays, without torch and without
executing anything from the file.

Layout of the legacy format: pickles of (magic number, protocol version, system info, the state
dict, the list of storage keys), then for each storage key in that order an 8-byte little-endian
element count followed by the storage's raw little-endian bytes. Tensors in the state dict are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls whose storage is a
persistent id; they are rebuilt here with numpy strides, so channels-last weights come out right.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file that is not a legacy PyTorch state dict this reader accepts."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRecord:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        if self.storage.data is None:
            raise CheckpointError(f"storage {self.storage.key} was never read")
        flat = self.storage.data
        itemsize = flat.itemsize
        if self.size and self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True)) >= len(
            flat
        ):
            raise CheckpointError(f"tensor view runs past storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # a contiguous copy


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> _TensorRecord:
    return _TensorRecord(storage, int(offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only OrderedDict, storage type markers and the tensor-rebuild functions."""

    def __init__(self, handle: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(handle)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise CheckpointError(f"checkpoint refers to {module}.{name}, which this reader does not allow")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unknown storage type in {pid!r:.80}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, numel)
        return self._storages[key]


def read_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the checkpoint's state dict as {parameter name: numpy array}."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    try:
        with path.open("rb") as handle:
            if handle.read(2) == b"PK":
                raise CheckpointError(f"{path}: a zip-format checkpoint; this reader takes the legacy format")
            handle.seek(0)
            magic = _RestrictedUnpickler(handle, storages).load()
            if magic != LEGACY_MAGIC_NUMBER:
                raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint (bad magic number)")
            _RestrictedUnpickler(handle, storages).load()  # protocol version
            _RestrictedUnpickler(handle, storages).load()  # system info
            state = _RestrictedUnpickler(handle, storages).load()
            keys = _RestrictedUnpickler(handle, storages).load()
            for key in keys:
                storage = storages[str(key)]
                count = int(np.frombuffer(handle.read(8), dtype="<i8")[0])
                itemsize = np.dtype(storage.dtype).itemsize
                raw = handle.read(count * itemsize)
                if len(raw) != count * itemsize:
                    raise CheckpointError(f"{path}: truncated storage {key}")
                storage.data = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the checkpoint does not hold a state dict")
    return {name: tensor.to_numpy() for name, tensor in state.items() if isinstance(tensor, _TensorRecord)}
