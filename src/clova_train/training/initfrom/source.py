"""A Hugging Face model directory to start a run from (``--init-from``): checked, hashed, and read one tensor at a time.

Only safetensors are read. A ``pytorch_model.bin`` is a pickle, which can run
code when loaded, so it is refused by its name and never opened. The model's
shape comes from ``config.json`` through the export adapter read the other way
(:func:`~clova_train.model.adapter.model_config_from_hf`), and every weight is
found by asking the adapter for the Hugging Face name of one of *our*
parameters, so nothing here knows an architecture's key names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clova_train.core.config import read_json_object
from clova_train.core.errors import ClovaError
from clova_train.core.files import file_sha256
from clova_train.model.config import ModelConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files that hold pickles: refused by name, never opened.
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Source tensors that are not weights of ours: GPT-2's causal-mask buffers, a rotary table, a head tied to the embedding.
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _adapter(arch: str):
    """The adapter's per-name functions for ``arch``: our name -> (Hugging Face name, shape), and a Hugging Face tensor -> ours."""
    from clova_train.model import adapter

    return (lambda n, s: adapter.hf_shape(n, s, arch=arch)), (lambda n, t: adapter.from_hf(n, t, arch=arch))


@dataclass
class SourceInfo:
    """What identifies a source directory: recorded in the run's config.json and in its identity."""

    path: str
    """The directory, absolute."""
    arch: str
    """Our block family the Hugging Face config maps to."""
    config_sha256: str
    """sha256 of its config.json."""
    fingerprint: dict[str, dict] = field(default_factory=dict)
    """Each safetensors file -> its size and the sha256 of its header (names, dtypes, shapes, offsets): cheap, on every rank."""
    files: dict[str, str] | None = None
    """Each safetensors file -> the sha256 of all of it, for the record (None until the pre-flight check hashed them)."""
    same_tokenizer: bool = True
    """The run's tokenizer is the source's own: embedding rows are copied as they are (else grafted)."""


def refuse_pickles(path: Path) -> None:
    """One line if ``path`` holds its weights only as a pickle; the file is never opened."""
    if (path / SAFETENSORS).is_file() or (path / SAFETENSORS_INDEX).is_file():
        return  # a pickle beside safetensors is ignored, not read
    found = [name for name in PICKLES if (path / name).exists()] or sorted(p.name for p in path.glob("*.bin"))
    if found:
        raise ClovaError(
            f"{path / found[0]}: a pickle (torch.save) checkpoint, which can run code when loaded, so --init-from "
            "does not open it; convert it to safetensors where you trust it (transformers: "
            "model.save_pretrained(dir, safe_serialization=True)) and point --init-from there"
        )
    raise ClovaError(f"{path}: no {SAFETENSORS} or {SAFETENSORS_INDEX}; --init-from needs a Hugging Face model directory with safetensors weights")


def weight_files(path: Path) -> list[str]:
    """The safetensors files of ``path``, from its index when sharded."""
    refuse_pickles(path)
    index = path / SAFETENSORS_INDEX
    if not index.is_file():
        return [SAFETENSORS]
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ClovaError(f"{index}: weight_map must be an object of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for f in files:
        if Path(f).name != f or not f.endswith(".safetensors"):
            raise ClovaError(f"{index}: weight_map names {f!r}, not a .safetensors file beside the index")
        if not (path / f).is_file():
            raise ClovaError(f"{path / f}: missing (named by {index.name}); the model directory is incomplete")
    return files


def read_config(path: Path) -> tuple[dict, str]:
    """config.json as a dict, and its sha256."""
    from clova_train.core.textfiles import read_text

    cfg_path = path / CONFIG
    config = read_json_object(cfg_path, missing="missing; --init-from needs a Hugging Face model directory (config.json + safetensors)")
    return config, hashlib.sha256(read_text(cfg_path).encode("utf-8")).hexdigest()


def source_model_config(path: Path) -> tuple[ModelConfig, dict, str]:
    """(our ModelConfig, the raw config.json, its sha256) of a source directory."""
    from clova_train.model.adapter import model_config_from_hf

    config, digest = read_config(path)
    try:
        cfg = model_config_from_hf(config)
    except ClovaError as e:
        raise ClovaError(f"{path / CONFIG}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ClovaError(f"{path / CONFIG}: cannot read the model's shape ({type(e).__name__}: {e})") from None
    return cfg, config, digest


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def fingerprint(path: Path, files: list[str]) -> dict[str, dict]:
    """Size and header hash of each weight file: what the run's identity holds, read in microseconds on every rank
    (hashing whole files on each of a thousand ranks at every start would read the model a thousand times)."""
    import struct

    out = {}
    for f in files:
        with open(path / f, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= MAX_HEADER:
                raise ClovaError(f"{path / f}: not a readable safetensors file (header length {n})")
            out[f] = {"bytes": (path / f).stat().st_size, "header_sha256": hashlib.sha256(fh.read(n)).hexdigest()}
    return out


def hash_files(path: Path, files: list[str], show: bool = True) -> dict[str, str]:
    """sha256 of each weight file, with a progress bar over the bytes."""
    from clova_train.core.progress import progress_bar

    sizes = {f: (path / f).stat().st_size for f in files}
    out = {}
    with progress_bar(f"hashing {path.name}", sum(sizes.values()), enabled=show, unit="bytes") as advance:
        for f in files:
            out[f] = file_sha256(path / f)
            advance(sizes[f])
    return out


class WeightReader:
    """Our parameters read from a source directory one tensor at a time (safetensors memory-maps the files)."""

    def __init__(self, path: str | Path, cfg: ModelConfig):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.cfg = cfg
        self._hf_shape, self._from_hf = _adapter(cfg.arch)
        self._where: dict[str, str] = {}
        self._open = {}
        for f in weight_files(self.path):
            try:
                handle = safe_open(str(self.path / f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ClovaError(f"{self.path / f}: not a readable safetensors file ({e})") from None
            self._open[f] = handle
            for k in handle.keys():
                self._where[k] = f

    def names(self) -> list[str]:
        return list(self._where)

    def locate(self, ours: str, shape: tuple[int, ...]) -> tuple[str, str | None]:
        """(the adapter's Hugging Face name for our parameter, the key the source stores it under or None).

        A checkpoint of the base model alone (GPT2Model, LlamaModel) stores the names without their first part.
        """
        hf, _ = self._hf_shape(ours, torch.Size(shape))
        if hf in self._where:
            return hf, hf
        short = hf.split(".", 1)[1] if "." in hf else None
        return hf, short if short in self._where else None

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file's header, without reading it."""
        return tuple(self._open[self._where[key]].get_slice(key).get_shape())

    def read(self, ours: str, shape: tuple[int, ...], rows: bool = False) -> torch.Tensor:
        """Our parameter ``ours`` of our ``shape``, as stored (its dtype), in our layout; with ``rows``, any number of rows."""
        hf, key = self.locate(ours, shape)
        if key is None:
            raise ClovaError(f"{self.path}: no tensor {hf!r} (our {ours}); the checkpoint does not match its config.json")
        f = self._where[key]
        try:
            tensor = self._open[f].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for damaged data
            raise ClovaError(f"{self.path / f}: tensor {key!r} does not read ({type(e).__name__}: {e})") from None
        _, tensor = self._from_hf(hf, tensor)
        got = tuple(tensor.shape)
        if (got[1:] if rows else got) != (tuple(shape)[1:] if rows else tuple(shape)):
            raise ClovaError(f"{self.path / f}: tensor {key!r} has shape {got} where our {ours} needs {tuple(shape)}")
        return tensor


def check_tensors(reader: WeightReader, shapes: dict[str, tuple[int, ...]], grafted: tuple[str, ...] = ()) -> None:
    """Every parameter of ours is in the source with its shape, and every source tensor has a place; headers only.

    ``grafted``: our parameters whose rows are rebuilt for another tokenizer, checked for width only.
    """
    from clova_train.model import adapter

    placed = set()
    for ours, shape in shapes.items():
        hf, key = reader.locate(ours, shape)
        if key is None:
            raise ClovaError(f"{reader.path}: no tensor {hf!r} for our {ours}; the weights do not match config.json")
        placed.add(key)
        stored = reader.stored_shape(key)
        _, want = reader._hf_shape(ours, torch.Size(shape))
        if ours in grafted:  # the vocabulary rows are rebuilt; the width must agree (embedding and head are row-major alike)
            stored, want = stored[1:], tuple(want)[1:]
        if tuple(stored) != tuple(want):
            raise ClovaError(f"{reader.path / reader._where[key]}: tensor {key!r} has shape {stored}, our {ours} needs {tuple(want)}")
    for key in reader.names():
        if key in placed or key.endswith(BUFFERS) or (reader.cfg.tie_embeddings and key == "lm_head.weight"):
            continue
        try:
            ours, _ = adapter.from_hf(key, torch.empty(0, 0), arch=reader.cfg.arch)
        except KeyError:
            ours = None
        if ours not in shapes:  # a part our block does not compute, or more layers than config.json says
            raise ClovaError(f"{reader.path / reader._where[key]}: tensor {key!r} has no place in our {reader.cfg.arch} model "
                             f"as config.json describes it; the checkpoint and its config do not match our block")
