"""Safetensors weights: the streaming, sharded writer export uses, and reading an export's weights back."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from clova_train.model.adapter import from_hf, hf_shape, to_hf
from clova_train.export.consolidate import Consolidated
from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, fsync_path

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """'5GB' (10^9 bytes, as Hugging Face counts), '500MiB', '2000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ClovaError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class _Entry:
    name: str
    """Hugging Face name."""
    shape: tuple[int, ...]
    nbytes: int


class SafetensorsWriter:
    """One .safetensors file written tensor by tensor, in an order fixed up front.

    The format is an 8-byte little-endian header length, a JSON header naming
    every tensor's dtype, shape and byte range, then the bytes; knowing every
    shape in advance lets the header go first and each tensor follow as it
    arrives, so a shard never sits in memory.
    """

    def __init__(self, path: Path, entries: list[_Entry], dtype: torch.dtype):
        self.path = path
        self._entries = entries
        self._next = 0
        self._dtype = dtype
        header: dict = {"__metadata__": {"format": "pt"}}
        start = 0
        for e in entries:
            header[e.name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(e.shape), "data_offsets": [start, start + e.nbytes]}
            start += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()  # the caller discards the whole temporary directory

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self._entries[self._next]
        if name != e.name or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"safetensors writer expected {e.name} {e.shape}, got {name} {tuple(tensor.shape)}")
        data = tensor.to(self._dtype).contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors were never written")
        self._f.close()
        fsync_path(self.path)


def plan_shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive groups of tensors, each at most ``max_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_weights(
    ckpt: Consolidated, out: Path, dtype: torch.dtype, max_bytes: int, advance=lambda n: None, arch: str = "gpt3"
) -> dict:
    """Stream ``ckpt`` into safetensors shard(s) under ``out``, named as ``arch``'s Hugging Face class names them; returns file names and sizes."""
    itemsize = dtype.itemsize
    entries = []
    for name, shape in ckpt.shapes.items():
        hf, hs = hf_shape(name, shape, arch)
        entries.append(_Entry(hf, hs, math.prod(hs) * itemsize))
    shards = plan_shards(entries, max_bytes)
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {e.name: f for f, shard in zip(names, shards) for e in shard}
    stream = ckpt.tensors()
    for fname, shard in zip(names, shards):
        with SafetensorsWriter(out / fname, shard, dtype) as writer:
            for _ in shard:
                name, tensor = next(stream)
                hf, t = to_hf(name, tensor, arch)
                writer.write(hf, t)
                advance(t.numel() * itemsize)
                del tensor, t  # one parameter resident at a time
    if next(stream, None) is not None:
        raise RuntimeError("the checkpoint yielded more tensors than its shapes announced")
    total = sum(e.nbytes for e in entries)
    if len(shards) > 1:
        atomic_write_json(out / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"files": names, "bytes": total, "tensors": len(entries)}


def _hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = path / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    for f in files:
        if not (path / f).is_file():
            raise ClovaError(f"{path / f}: missing; the model directory is incomplete")
        with safe_open(str(path / f), framework="pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def load_hf_state_dict(path: str | Path, dtype: torch.dtype = torch.float32, arch: str = "gpt3", tied: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face directory of ``arch``'s class (a tied lm_head dropped)."""
    sd = {}
    for k, t in _hf_tensors(Path(path)):
        if (k == "lm_head.weight" and tied) or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # the tied head, and old GPT-2 exports' causal-mask buffers
        try:
            name, t = from_hf(k, t, arch)
        except KeyError:
            raise ClovaError(f"{path}: tensor {k!r} has no place in our {arch} model; not a model clova-train can run") from None
        sd[name] = t.to(dtype).contiguous()
    return sd
