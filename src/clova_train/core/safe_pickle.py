"""The one gate for pickles from elsewhere: an exact allow-list of (module, name) globals, nothing else constructed.

Checkpoints are shared and downloaded; a pickle can name any callable and
have the unpickler call it. :class:`SafeUnpickler` hands out only what real
DeepSpeed ZeRO-3 and pipeline checkpoints contain (listed from the files our
own runs write): tensor-rebuild functions (answered with :class:`OnDisk`
references, no data read), storage types, ``collections.OrderedDict``,
numpy's array rebuild, a few plain builtins, and DeepSpeed's enums and small
records as stand-ins known by name (no DeepSpeed module is imported).

Nothing it admits allocates a size the file chooses: callables that would
(``bytearray(n)``, ``torch.Tensor(n)``, ``numpy.ndarray(shape)``) are
admitted only in the forms ``torch.save`` writes, whose sizes are the
pickle's own data, and every zip record must be stored uncompressed inside
the file. ``torch.load`` (resume) then meets only what passed here.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class EnumMember:
    """An enum member of a class we do not import, known by name only."""

    owner: str
    name: str


class Opaque:
    """Stands in for the DeepSpeed classes checkpoints mention (enums, loss scaler, fragment records)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# Enum members a pickle may ask for by name (Python 3.11.0-3.11.4 pickle them as getattr(EnumClass, "weights")).
_ENUM_MEMBERS = {
    "ZeroStageEnum": {"disabled", "optimizer_states", "gradients", "weights", "max_stage"},
    "OffloadDeviceEnum": {"none", "cpu", "nvme"},
}

# DeepSpeed classes found in the checkpoints of our ZeRO-3 and pipeline runs (fp16 adds the dynamic scaler,
# offload the device enum). They become Opaque subclasses of the same name.
_DEEPSPEED = {
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.zero.offload_config", "OffloadDeviceEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
}

_STANDINS: dict[tuple[str, str], type] = {
    key: type(key[1], (Opaque,), {"__module__": key[0], "__qualname__": key[1]}) for key in _DEEPSPEED
}


def _getattr(obj, name):
    """getattr for enum stand-ins only: the one use real checkpoints make of it."""
    owner = getattr(obj, "__name__", None) if isinstance(obj, type) and issubclass(obj, Opaque) else None
    if owner not in _ENUM_MEMBERS or name not in _ENUM_MEMBERS[owner]:
        raise UnsafeGlobal("builtins", f"getattr(..., {name!r})")
    return EnumMember(owner, name)


def _encode(text, encoding="latin1"):
    """Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1'); no other codec is looked up."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeGlobal("_codecs", f"encode(..., {encoding!r})")
    return text.encode("latin1")


def _rebuild_tensor(storage, offset, size, *rest):
    return OnDisk(storage[0], storage[1], offset, tuple(size))


class _Refused:
    """A class a pickle may name as an argument (``torch.Tensor`` to ``_rebuild_from_type_v2``, ``numpy.ndarray`` to
    numpy's rebuild) but never call: called, it would allocate whatever size the pickle asks for."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise UnsafeGlobal(self.module, f"{self.name}(...)")


_TENSOR = _Refused("torch", "Tensor")
_NDARRAY = _Refused("numpy", "ndarray")


def _from_type(func, cls, args, state):
    """torch.save writes ``_rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, ...)`` only."""
    if func is not _rebuild_tensor or cls is not _TENSOR:
        raise UnsafeGlobal("torch._tensor", "_rebuild_from_type_v2 of something other than a tensor")
    return func(*args)


def _bytearray(*args):
    """``bytearray(str, "latin-1")`` as protocol 2 writes one; never ``bytearray(n)``, n bytes of the pickle's choosing."""
    if not args or (len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1")) or (
        len(args) == 1 and isinstance(args[0], (bytes, bytearray))
    ):
        return bytearray(*args)
    raise UnsafeGlobal("builtins", f"bytearray({', '.join(type(a).__name__ for a in args)})")


class _DType:
    """numpy's dtype as a pickle rebuilds it: numbers and booleans only (no objects, whose arrays numpy
    fills from the pickle unchecked), and the state numpy itself writes for that type."""

    def __init__(self, spec, align=False, copy=False):
        try:
            self.real = np.dtype(spec) if isinstance(spec, str) else None
        except TypeError:
            self.real = None
        if self.real is None or self.real.kind not in "biufc":
            raise UnsafeGlobal("numpy", f"dtype({spec!r})")

    def __setstate__(self, state):
        own = self.real.__reduce__()[2]
        if not (isinstance(state, tuple) and len(state) == len(own) and state[0] == own[0] and state[1] in "<>|="
                and state[2:] == own[2:]):
            raise UnsafeGlobal("numpy", "dtype state numpy never writes")
        self.real = self.real.newbyteorder(state[1])


class _Array:
    """numpy's array rebuild: an empty array, then its shape and bytes; the bytes must be exactly the shape's."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[2], _DType)
                and isinstance(state[1], tuple) and all(isinstance(n, int) and n >= 0 for n in state[1])
                and isinstance(state[4], bytes) and len(state[4]) == math.prod(state[1]) * state[2].real.itemsize):
            raise UnsafeGlobal("numpy", "ndarray state whose data is not its shape's size")
        self.array = np.frombuffer(state[4], dtype=state[2].real).reshape(state[1], order="F" if state[3] else "C")


def _reconstruct_array(subtype, shape, code):
    if subtype is not _NDARRAY or tuple(shape) != (0,) or code != b"b":
        raise UnsafeGlobal("numpy", "_reconstruct of anything but an empty ndarray")
    return _Array()


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.real.itemsize:
        raise UnsafeGlobal("numpy", "scalar of anything but a number's bytes")
    return np.frombuffer(data, dtype=dtype.real)[0]


_FIXED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *rest: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *rest: data,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch", "Tensor"): _TENSOR,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "getattr"): _getattr,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    # numpy 1 pickles its array rebuild under numpy.core, numpy 2 under numpy._core: the same two functions.
    **{(m, name): f for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, f in (("_reconstruct", _reconstruct_array), ("scalar", _numpy_scalar))},
    **_STANDINS,
}

_STORAGES = {
    "DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage", "ShortStorage",
    "CharStorage", "ByteStorage", "BoolStorage",
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class UnsafeGlobal(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class SafeUnpickler(pickle.Unpickler):
    """Unpickles the structure of a torch.save file; tensors become :class:`OnDisk`, anything unlisted is refused.

    ``records`` (storage key -> bytes stored) bounds each storage a tensor names by the data the file holds.
    """

    def __init__(self, file, records: dict[str, int] | None = None):
        super().__init__(file)
        self.records = records

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol-2 pickles name Python 2's module
            module = "builtins"
        if (module, name) in _FIXED:
            return _FIXED[module, name]
        if module == "torch" and name in _STORAGES:
            return StorageType(name)  # as torch.load does; just the dtype, no deprecated storage class
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        raise UnsafeGlobal(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        kind, storage_type, key, _location, numel = pid
        if (kind.decode() if isinstance(kind, bytes) else kind) != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, StorageType) else torch.uint8
        if self.records is not None:  # torch.load would allocate numel elements, whatever the record holds
            stored = self.records.get(str(key))
            if stored is None or not isinstance(numel, int) or not 0 <= numel * dtype.itemsize <= stored:
                raise pickle.UnpicklingError(f"storage {key!r} of {numel!r} elements is not in the file")
        return (str(key), dtype)


# What a torch.save zip holds besides data.pkl and data/<key>; anything else (TorchScript code, constants.pkl,
# a second pickle) makes torch.load take another path, so it is refused.
_ZIP_EXTRAS = {".format_version", ".storage_alignment", "byteorder", "version", ".data/version", ".data/serialization_id"}


class _Damaged(ClovaError):
    """The file is cut short or not a torch.save file: an error, but not a hostile one."""


def read_structure(path: Path, zf: zipfile.ZipFile) -> tuple[object, str]:
    """(the unpickled structure, the archive's name prefix) of an opened torch.save zip, through the allow-list."""
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise _Damaged(f"{path}: not a torch.save checkpoint file")
    prefix = pkl[0][: -len("data.pkl")]
    for n in names:
        rest = n[len(prefix):] if n.startswith(prefix) else None
        if rest is None or not (rest == "data.pkl" or rest in _ZIP_EXTRAS or (rest.startswith("data/") and rest[5:].isdigit())):
            raise ClovaError(f"{path}: holds {n!r}, which torch.save files never do; refusing to load it (it may run code)")
    size = os.fstat(zf.fp.fileno()).st_size
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ClovaError(
                f"{path}: {info.filename!r} is compressed, which torch.save never does; refusing to load it "
                "(unpacking it could take any amount of memory)"
            )
        if info.header_offset + info.file_size > size or info.compress_size != info.file_size:
            raise _Damaged(f"{path}: {info.filename!r} claims {info.file_size:,} bytes, more than the file holds; the file is damaged")
    records = {n[len(prefix) + 5:]: zf.getinfo(n).file_size for n in names if n[len(prefix):].startswith("data/")}
    try:
        return SafeUnpickler(io.BytesIO(zf.read(pkl[0])), records).load(), prefix
    except UnsafeGlobal as e:
        raise ClovaError(
            f"{path}: its pickle asks for {e.what}, which checkpoints never contain; refusing to load it "
            "(the file may be malicious: do not use it)"
        ) from None
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
        raise _Damaged(f"{path}: cannot read its structure ({type(e).__name__}: {e}); the file is damaged") from None


def check_torch_file(path: str | Path, *, only_code: bool = False) -> None:
    """Raise a one-line ClovaError unless ``path`` is a torch.save zip whose pickle uses only allow-listed globals.

    For files that are then opened with ``torch.load(weights_only=False)`` (DeepSpeed's resume): the pickle
    is run here against stand-ins first, so torch.load meets only the globals this gate allowed.
    ``only_code`` lets a damaged file pass (its reader reports it in its own words) and refuses only code.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        if only_code:
            return
        raise ClovaError(f"{path}: not a torch.save zip file ({e}); refusing to load it") from None
    with zf:
        try:
            read_structure(path, zf)
        except _Damaged:
            if not only_code:
                raise
