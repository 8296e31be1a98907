"""torch.save files read without torch.load: the pickled structure now, tensor data on demand, by ``pread``.

Nothing in a checkpoint is trusted: the structure goes through
:mod:`clova_train.core.safe_pickle`'s allow-list, tensors become
:class:`OnDisk` references, and nothing else that could run is handed out.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import torch

from clova_train.core.errors import ClovaError
from clova_train.core.safe_pickle import EnumMember, OnDisk, Opaque, read_structure

__all__ = ["OnDisk", "TorchZip"]


_ZERO_STAGES = {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3}


def _zero_stage(value) -> int | None:
    """DeepSpeed's ZeroStageEnum as an int, however the checkpoint's Python pickled it."""
    if isinstance(value, Opaque):
        value = value.args[0] if value.args else None
    elif isinstance(value, EnumMember):
        value = _ZERO_STAGES.get(value.name)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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
        self._fd = -1
        self._records: dict[str, tuple[int, int]] = {}  # key -> (data start, size) in bytes
        try:
            self.obj, self._prefix = read_structure(path, self._zip)
            self._fd = os.open(path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

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


