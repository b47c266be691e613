"""PyTorch's ``.pt`` file format for plain tensors, read and written without PyTorch.

Condensed sets of the field are shared as ``torch.save`` files (DC-BENCH, DD-Ranking). A JAX
user should be able to write and read them without installing PyTorch, so this module speaks the
format directly: a zip archive holding ``<name>/data.pkl`` (a protocol-2 pickle in which every
tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and every
storage a persistent id ``("storage", torch.<Type>Storage, key, "cpu", numel)``), the raw
little-endian bytes of storage ``key`` in ``<name>/data/<key>``, and ``byteorder`` and
``version`` records. Only dense CPU tensors inside dicts, lists and tuples are supported; that is
all a condensed set needs. ``torch.load`` (``weights_only=True`` included) reads what ``save``
writes, and ``load`` reads what ``torch.save`` writes (tests/test_export.py holds a file made
by PyTorch).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage class <-> NumPy dtype, for the dtypes a condensed set uses.
_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
             "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_STORAGE_OF = {np.dtype(v): k for k, v in _STORAGES.items()}
_ALIGNMENT = 64      # torch aligns each storage's bytes in the archive to 64 bytes


class _Global:
    """A name that the pickle refers to (GLOBAL opcode) without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):    # pickle accepts only callables as reduce functions
        raise TypeError(f"{self.module}.{self.name} is a placeholder")


class _Storage:
    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = array, key


class _Tensor:
    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = array, key

    def __reduce__(self):
        shape = tuple(int(d) for d in self.array.shape)
        stride, step = [], 1
        for d in reversed(shape):           # C-contiguous strides in elements
            stride.insert(0, step)
            step *= max(d, 1)
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (_Storage(self.array, self.key), 0, shape, tuple(stride), False,
                 collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_name(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_name

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            storage = _Global("torch", _STORAGE_OF[obj.array.dtype])
            return ("storage", storage, obj.key, "cpu", int(obj.array.size))
        return None


def save(path: str, value: Any) -> None:
    """Write ``value`` (NumPy arrays inside dicts, lists, tuples, numbers, strings) as a
    ``torch.save`` file in which every array is a CPU tensor of the same dtype and shape."""
    arrays: list[np.ndarray] = []

    def wrap(v):
        if isinstance(v, np.ndarray):
            array = np.array(v, order="C")     # (ascontiguousarray would make 0-d arrays 1-d)
            if array.dtype not in _STORAGE_OF:
                raise ValueError(f"cannot store dtype {array.dtype} as a torch tensor")
            arrays.append(array.astype(array.dtype.newbyteorder("<"), copy=False))
            return _Tensor(arrays[-1], str(len(arrays) - 1))
        if isinstance(v, dict):
            return {k: wrap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(wrap(x) for x in v)
        return v

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(wrap(value))
    name = "archive"
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/data.pkl", buffer.getvalue())
        archive.writestr(f"{name}/byteorder", "little")
        for key, array in enumerate(arrays):
            _write_aligned(archive, f"{name}/data/{key}", array.tobytes())
        archive.writestr(f"{name}/version", "3\n")
    os.replace(tmp, path)


def _write_aligned(archive: zipfile.ZipFile, entry: str, payload: bytes) -> None:
    """Store ``payload`` with its first byte at a multiple of 64 in the file (as torch does),
    padding the local header's extra field."""
    info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
    header = 30 + len(entry.encode())           # fixed local header + file name
    offset = archive.fp.tell() + header + 4     # + the extra field's own 4-byte header
    pad = -offset % _ALIGNMENT
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    archive.writestr(info, payload)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return np.dtype(_STORAGES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch", "Size"):
            return tuple
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain tensor; only files of "
                                     f"dense tensors in dicts, lists and tuples can be read")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent record {kind!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=numel)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


def load(path: str) -> Any:
    """Read a ``torch.save`` file of dense tensors; every tensor becomes a NumPy array."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if not pickles:
                raise ValueError(f"{path} has no data.pkl record")
            prefix = pickles[0][: -len("/data.pkl")]
            with archive.open(pickles[0]) as f:
                return _Unpickler(io.BytesIO(f.read()), archive, prefix).load()
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a torch.save file (not a zip archive; files of "
                         f"torch < 1.6 are not supported)") from None
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable torch.save file of tensors "
                         f"({type(err).__name__}: {err})") from None


__all__ = ["save", "load"]
