"""torch.save files read without torch.load: the pickled structure now, tensor data on demand, by ``pread``.

Nothing in a checkpoint is trusted: the unpickler builds tensors as
:class:`OnDisk` references and never hands out anything else that could run.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.serialization import StorageType

from clova_train.core.errors import ClovaError


@dataclass(frozen=True)
class OnDisk:
    """A tensor inside a torch.save file, not read yet."""

    key: str
    dtype: torch.dtype
    offset: int
    """Elements from the start of its storage."""
    shape: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)


class _OpaqueMeta(type):
    def __getattr__(cls, name: str):
        # Python 3.11.0-3.11.4 pickle enum members by name, as getattr(EnumClass,
        # "weights"); later versions as EnumClass(3). Both must read back.
        if name.startswith("__"):
            raise AttributeError(name)
        return _EnumMember(cls.__name__, name)


@dataclass(frozen=True)
class _EnumMember:
    """An enum member of a class export does not import, known by name only."""

    owner: str
    name: str


_ZERO_STAGES = {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3}


def _zero_stage(value) -> int | None:
    """DeepSpeed's ZeroStageEnum as an int, however the checkpoint's Python pickled it."""
    if isinstance(value, _Opaque):
        value = value.args[0] if value.args else None
    elif isinstance(value, _EnumMember):
        value = _ZERO_STAGES.get(value.name)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Opaque(metaclass=_OpaqueMeta):
    """Stands in for classes the structure mentions but export never needs (DeepSpeed's enums, loss scaler)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_ALLOWED_MODULES = ("builtins", "collections", "torch", "numpy", "_codecs", "copyreg")


class _LazyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lambda storage, offset, size, stride, *rest: OnDisk(storage[0], storage[1], offset, tuple(size))
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, cls, args, state: func(*args)
        if module == "torch" and name.endswith("Storage") and name != "UntypedStorage":
            return StorageType(name)  # as torch.load does; just the dtype, no deprecated storage class
        if module == "__builtin__":  # protocol-2 pickles name Python 2's module (enums: getattr)
            module = "builtins"
        if module.split(".")[0] in _ALLOWED_MODULES:
            return super().find_class(module, name)
        return _OpaqueMeta(name, (_Opaque,), {"__module__": module})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if (kind.decode() if isinstance(kind, bytes) else kind) != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, StorageType) else torch.uint8
        return (str(key), dtype)


class TorchZip:
    """A torch.save (zip) file: its pickled structure now, tensor data on demand.

    The format is stable and simple: ``<name>/data.pkl`` pickles the object
    with each storage as a persistent id, and ``<name>/data/<key>`` holds that
    storage's bytes, uncompressed. Reading a slice is one ``pread``.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ClovaError(f"{path}: unreadable ({e}); the checkpoint is damaged, export another step") from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ClovaError(f"{path}: not a torch.save checkpoint file")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._fd = os.open(path, os.O_RDONLY)
        self._records: dict[str, tuple[int, int]] = {}  # key -> (data start, size) in bytes
        try:
            self.obj = _LazyUnpickler(io.BytesIO(self._zip.read(pkl[0]))).load()
        except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
            self.close()
            raise ClovaError(f"{path}: cannot read its structure ({type(e).__name__}: {e}); export another step") from None

    def _record(self, key: str) -> tuple[int, int]:
        if key not in self._records:
            info = self._zip.getinfo(f"{self._prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ClovaError(f"{self.path}: tensor data is compressed; not a torch.save file")
            # The data follows the local header, whose name and extra fields may differ from the central directory's.
            local = os.pread(self._fd, 30, info.header_offset)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            self._records[key] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
        return self._records[key]

    def read_into(self, t: OnDisk, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` (1-D, ``t.dtype``) with ``t``'s flat elements from ``start``."""
        size = t.dtype.itemsize
        first = (t.offset + start) * size
        nbytes = out.numel() * size
        base, stored = self._record(t.key)
        if first + nbytes > stored:
            raise ClovaError(f"{self.path}: tensor data ends early; the file is truncated, export another step")
        view = memoryview(out.view(torch.uint8).numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], base + first + done)
            if n <= 0:
                raise ClovaError(f"{self.path}: file ends early; the checkpoint is truncated, export another step")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._zip.close()


