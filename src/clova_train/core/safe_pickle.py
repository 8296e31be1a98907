"""The one gate for pickles from elsewhere: an exact allow-list of (module, name) globals, nothing else constructed.

Checkpoints are shared and downloaded; a pickle can name any callable and
have the unpickler call it. :class:`SafeUnpickler` hands out only what real
DeepSpeed ZeRO-3 and pipeline checkpoints contain (listed from the files our
own runs write): tensor-rebuild functions (answered with :class:`OnDisk`
references, no data read), storage types, ``collections.OrderedDict``,
numpy's array rebuild, a few plain builtins, and DeepSpeed's enums and small
records as stand-ins known by name (no DeepSpeed module is imported).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.serialization import StorageType

try:
    from numpy._core.multiarray import _reconstruct, scalar as _scalar
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct, scalar as _scalar

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


_FIXED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *rest: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *rest: data,
    ("torch._tensor", "_rebuild_from_type_v2"): lambda func, cls, args, state: func(*args),
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "getattr"): _getattr,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # numpy 1 pickles its array rebuild under numpy.core, numpy 2 under numpy._core: the same two functions.
    **{(m, f.__name__): f for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in (_reconstruct, _scalar)},
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
    """Unpickles the structure of a torch.save file; tensors become :class:`OnDisk`, anything unlisted is refused."""

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
        kind, storage_type, key, _location, _numel = pid
        if (kind.decode() if isinstance(kind, bytes) else kind) != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, StorageType) else torch.uint8
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
    try:
        return SafeUnpickler(io.BytesIO(zf.read(pkl[0]))).load(), prefix
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
