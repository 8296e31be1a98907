"""Consolidating a run's DeepSpeed checkpoint into our own parameter names.

Export never parses DeepSpeed's layout itself: it asks this module for a
:class:`Consolidated` checkpoint, which knows every parameter's name (ours,
as in ``model.GPT``) and shape up front and then yields ``(name, fp32
tensor)`` one parameter at a time. There is one reader per parallel mode;
everything downstream (the Hugging Face key map, the safetensors writer,
verification) is shared.

Memory stays near the size of the largest parameter: the ranks' optimizer
files are never loaded. Their pickled structure is read with the tensors
left on disk (:class:`TorchZip`), and each parameter's slices are read from
each rank's fp32 partition straight into one buffer.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch.serialization import StorageType

from .config import read_json_object
from .errors import ClovaError
from .model import GPT, ModelConfig

CHECKPOINTS = "checkpoints"
MARKER = "clova_checkpoint.json"
LATEST = "latest"
RUN_CONFIG = "config.json"


# ---------------------------------------------------------------- run dir and tags


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint of a run, chosen by step."""

    run_dir: Path
    tag: str
    marker: dict
    """The completion marker: step, tokens, losses."""
    run_config: dict
    model: ModelConfig
    parallel: str
    """The parallel mode that wrote it: "zero3" or "pipeline"."""

    @property
    def path(self) -> Path:
        return self.run_dir / CHECKPOINTS / self.tag

    @property
    def step(self) -> int:
        return int(self.marker.get("step", -1))

    @property
    def losses(self) -> dict:
        """Final losses as the marker records them ("loss" and "valid_loss", or a "losses" dict)."""
        if isinstance(self.marker.get("losses"), dict):
            return self.marker["losses"]
        named = (("loss", "train"), ("valid_loss", "valid"))
        return {name: self.marker[k] for k, name in named if self.marker.get(k) is not None}


def read_run_config(run_dir: Path) -> dict:
    path = run_dir / RUN_CONFIG
    if not run_dir.is_dir():
        raise ClovaError(f"{run_dir}: no such run directory; pass the directory `clova train` wrote")
    if not path.is_file():
        raise ClovaError(f"{run_dir}: not a run directory (no {RUN_CONFIG}); pass the directory `clova train` wrote")
    cfg = read_json_object(path)
    if "model" not in cfg:
        raise ClovaError(f"{path}: has no 'model' section; pass the directory `clova train` wrote")
    return cfg


def model_config(run_cfg: dict, where: str) -> ModelConfig:
    from .config import from_dict

    return from_dict(ModelConfig, run_cfg["model"], where=f"{where} 'model'")


def _complete_tags(ckpt_dir: Path) -> dict[str, dict]:
    """tag -> completion marker, for every checkpoint that finished writing."""
    out = {}
    for marker in ckpt_dir.glob(f"*/{MARKER}"):
        try:
            out[marker.parent.name] = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _steps(tags: dict[str, dict]) -> str:
    return ", ".join(str(m.get("step")) for m in sorted(tags.values(), key=lambda m: m.get("step", -1))) or "none"


def resolve_checkpoint(run_dir: str | Path, step: int | str | None = "latest", *, tag: str | None = None) -> CheckpointRef:
    """The complete checkpoint for ``step`` (an int, or "latest"), or the one named ``tag``."""
    run_dir = Path(run_dir)
    run_cfg = read_run_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    tags = _complete_tags(ckpt_dir) if ckpt_dir.is_dir() else {}
    started = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
    if not tags:
        if started:
            raise ClovaError(
                f"{run_dir}: no complete checkpoint ({', '.join(started)} lack {MARKER}, so they were still being "
                "written when training stopped); resume training until it saves one"
            )
        raise ClovaError(f"{run_dir}: has no checkpoints (nothing under {CHECKPOINTS}/); train with `clova train` first")

    if tag is None:
        if step is None or str(step) == "latest":
            latest = ckpt_dir / LATEST
            named = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
            # "latest" is written after the marker; without it, the newest complete step is the answer.
            tag = named if named in tags else max(tags, key=lambda t: tags[t].get("step", -1))
        else:
            try:
                n = int(step)
            except ValueError:
                raise ClovaError(f"--step must be a step number or 'latest', not {step!r}") from None
            found = [t for t, m in tags.items() if m.get("step") == n]
            if not found:
                incomplete = [t for t in started if t not in tags and re.search(rf"(?<!\d)0*{n}$", t)]
                why = f" ({incomplete[0]} lacks {MARKER}: it was not finished)" if incomplete else ""
                raise ClovaError(f"{run_dir}: no complete checkpoint at step {n}{why}; complete steps: {_steps(tags)}")
            tag = found[0]
    elif tag not in tags:
        what = "is incomplete (no " + MARKER + ")" if (ckpt_dir / tag).is_dir() else "does not exist"
        raise ClovaError(f"{run_dir}: checkpoint {tag!r} {what}; complete steps: {_steps(tags)}")

    parallel = run_cfg.get("parallel", "zero3")
    mode = parallel.get("mode", "zero3") if isinstance(parallel, dict) else str(parallel)
    return CheckpointRef(run_dir, tag, tags[tag], run_cfg, model_config(run_cfg, str(run_dir / RUN_CONFIG)), mode)


# ---------------------------------------------------------------- torch.save files, tensors left on disk


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


# ---------------------------------------------------------------- one reader per parallel mode


class Consolidated(Protocol):
    """A checkpoint seen as our own parameters, one at a time."""

    shapes: dict[str, torch.Size]
    """Our parameter names and shapes, in the order ``tensors`` yields them."""
    source: str
    """Where the weights come from, for the model card ("fp32 master weights from the optimizer state")."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def close(self) -> None: ...


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")


def empty_model(cfg: ModelConfig) -> GPT:
    """Our GPT on the meta device: names and shapes, no memory, no initialisation.

    Initialising meta tensors still runs torch's Python reference kernels,
    whose first use costs seconds, for values nobody reads; so, like
    transformers' ``no_init_weights``, the ``torch.nn.init`` functions are
    no-ops while the model is built (not thread-safe, and brief).
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return GPT(cfg)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for ``cfg``, without allocating the model."""
    return {n: p.shape for n, p in empty_model(cfg).named_parameters()}


def _match_names(shapes: dict[str, torch.Size], ref: CheckpointRef) -> dict[str, str]:
    """Checkpoint name -> our name, after checking every name and shape against the run's ModelConfig.

    A module that wraps GPT (as an engine may) prefixes every name alike
    ("module.wte.weight"); that prefix, read off the token embedding, is dropped.
    """
    expected = expected_shapes(ref.model)
    prefixes = {n[: -len("wte.weight")] for n in shapes if n.endswith("wte.weight")}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    ours = {n: n[len(prefix) :] if n.startswith(prefix) else n for n in shapes}
    got = {ours[n]: tuple(s) for n, s in shapes.items()}
    want = {n: tuple(s) for n, s in expected.items()}
    _check_against_config(ref, got, want)
    return ours


def _check_against_config(ref: CheckpointRef, got: dict[str, object], want: dict[str, object]) -> None:
    """One error for a checkpoint whose parameters (name -> shape or size) are not the run config's model."""
    if got == want:
        return
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(n for n in set(want) & set(got) if want[n] != got[n])
    show = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    detail = "; ".join(
        x
        for x in (
            f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "") if missing else "",
            f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "") if extra else "",
            ", ".join(f"{n} is {show(got[n])} not {show(want[n])}" for n in differ[:3]) if differ else "",
        )
        if x
    )
    m = ref.model
    raise ClovaError(
        f"{ref.path}: checkpoint does not match {ref.run_dir / RUN_CONFIG} (n_layer={m.n_layer}, "
        f"n_embd={m.n_embd}, vocab_size={m.vocab_size}, block_size={m.block_size}): {detail}; "
        "export from the run dir whose training wrote this checkpoint"
    )


_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


class Zero3Checkpoint:
    """A ZeRO-3 checkpoint, read from the fp32 master partitions in each rank's optimizer file.

    Each rank's optimizer state holds, per parameter group, one flat fp32
    tensor: the concatenation of that rank's slice of every parameter in the
    group, in ``param_shapes`` order. A parameter of n elements contributes
    ceil(n / world) elements to every rank (the last rank's slice padded);
    rank r holds elements [r * ceil(n / world), (r + 1) * ceil(n / world)).
    ZeRO-3's model-state files hold only empty placeholders, so without the
    optimizer files there are no weights to export.
    """

    source = "fp32 master weights from the ZeRO-3 optimizer state"

    def __init__(self, ref: CheckpointRef):
        self.ref = ref
        files: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
        for p in ref.path.iterdir():
            m = _RANK_FILE.match(p.name)
            if m:
                if int(m.group(2)) != 0:
                    raise ClovaError(f"{p}: tensor-parallel checkpoints (mp_rank > 0) are not supported by export")
                files[m.group(3)][int(m.group(1))] = p
        if not files["model"] and not files["optim"]:
            raise ClovaError(f"{ref.path}: no ZeRO-3 rank files (zero_pp_rank_*_states.pt); is config.json's 'parallel' right?")
        if not files["optim"]:
            raise ClovaError(
                f"{ref.path}: no optimizer states (*_optim_states.pt): ZeRO-3 keeps the full weights only there; "
                "export a checkpoint saved with its optimizer state"
            )
        self._files: list[TorchZip] = []
        try:
            first = TorchZip(files["optim"][min(files["optim"])])
            self._files.append(first)
            osd = first.obj["optimizer_state_dict"]
            stage = _zero_stage(osd.get("zero_stage"))
            if stage != 3:
                raise ClovaError(f"{ref.path}: a ZeRO stage {stage} checkpoint, but config.json says 'zero3'")
            world = osd["partition_count"]
            world = max(world) if isinstance(world, (list, tuple)) else int(world)
            for kind in ("optim", "model"):
                lost = sorted(set(range(world)) - set(files[kind]))
                if lost:
                    raise ClovaError(
                        f"{ref.path}: partial checkpoint: {kind}-state file(s) of rank(s) {', '.join(map(str, lost))} "
                        f"of {world} are missing; export a complete step or copy the missing files back"
                    )
            self.world = world
            for r in range(1, world):
                self._files.append(TorchZip(files["optim"][r]))
            self._flat = [z.obj["optimizer_state_dict"]["fp32_flat_groups"] for z in self._files]
            meta = TorchZip(files["model"][0])
            try:
                group_shapes = [dict(g) for g in meta.obj["param_shapes"]]
                if meta.obj.get("frozen_param_shapes"):
                    raise ClovaError(f"{ref.path}: has frozen parameters; the GPT model has none, so this is not our run")
            finally:
                meta.close()
            self._check_layout(group_shapes)
        except BaseException:
            self.close()
            raise

    def _check_layout(self, group_shapes: list[dict[str, torch.Size]]) -> None:
        ref, world = self.ref, self.world
        if len(group_shapes) != len(self._flat[0]):
            raise ClovaError(f"{ref.path}: {len(group_shapes)} parameter groups but {len(self._flat[0])} fp32 partitions")
        all_shapes = {n: s for g in group_shapes for n, s in g.items()}
        self._ours = _match_names(all_shapes, ref)
        self._groups = group_shapes
        self.shapes = {self._ours[n]: torch.Size(s) for n, s in all_shapes.items()}
        for g, shapes in enumerate(group_shapes):
            used = sum(math.ceil(math.prod(s) / world) for s in shapes.values())
            for r, flat in enumerate(self._flat):
                if flat[g].numel() != used:
                    raise ClovaError(
                        f"{ref.path}: rank {r} group {g} holds {flat[g].numel()} fp32 elements, the shapes need "
                        f"{used}; the files come from different saves or a newer DeepSpeed layout"
                    )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        world = self.world
        for g, shapes in enumerate(self._groups):
            offset = 0
            for name, shape in shapes.items():
                n = math.prod(shape)
                part = math.ceil(n / world)
                full = torch.empty(part * world, dtype=torch.float32)
                for r, (z, flat) in enumerate(zip(self._files, self._flat)):
                    z.read_into(flat[g], offset, full[r * part : (r + 1) * part])
                offset += part
                yield self._ours[name], full[:n].view(tuple(shape))

    def close(self) -> None:
        for z in getattr(self, "_files", []):
            z.close()
        self._files = []


_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


@dataclass(frozen=True)
class _Piece:
    """Consecutive elements of one parameter, stored in a torch.save file."""

    file: TorchZip
    tensor: OnDisk
    start: int
    """Elements from the start of ``tensor``."""
    numel: int


def _field(obj, name: str):
    """A field of a small DeepSpeed record (e.g. fragment_address), unpickled as _Opaque or as itself."""
    state = getattr(obj, "state", None)
    return state[name] if isinstance(state, dict) and name in state else getattr(obj, name)


class PipelineCheckpoint:
    """A pipeline checkpoint (DeepSpeed PipelineModule, ZeRO stage 0 or 1) under our names.

    Each stage's ZeRO-1 optimizer file (``zero_pp_rank_<replica>_mp_rank_<stage>``)
    holds, per parameter group, that replica's slice of the stage's flat fp32
    master weights, and ``param_slice_mappings`` says where each parameter's
    part of the slice lies, by PipelineModule name; a parameter's parts in
    replica order make it whole. :func:`parallel.pipeline_names` turns those
    names into ours; the tied embedding appears on the first and the last
    stage alike, and the first stage's copy is read. Without such optimizer
    files (ZeRO-0 in fp32, or an older DeepSpeed) the weights come from the
    layer files (``layer_<i>-model_states.pt``, in the training precision),
    named by :func:`parallel.pipeline_layer_names`.
    """

    def __init__(self, ref: CheckpointRef):
        from .parallel import pipeline_layer_names, pipeline_names

        self.ref = ref
        self._files: list[TorchZip] = []
        layers: dict[int, Path] = {}
        optim: dict[tuple[int, int], Path] = {}  # (stage, replica) -> file
        for p in ref.path.iterdir():
            if m := _LAYER_FILE.match(p.name):
                layers[int(m.group(1))] = p
            elif (m := _RANK_FILE.match(p.name)) and m.group(3) == "optim":
                optim[int(m.group(2)), int(m.group(1))] = p
        if not layers:
            raise ClovaError(f"{ref.path}: no pipeline layer files (layer_*-model_states.pt); is config.json's 'parallel' right?")
        self.shapes = expected_shapes(ref.model)
        try:
            pieces = self._from_optimizer(optim, pipeline_names(ref.model)) if optim else None
            if pieces is None:
                pieces = self._from_layers(layers, pipeline_layer_names(ref.model))
                dtypes = sorted({str(p.tensor.dtype).removeprefix("torch.") for parts in pieces.values() for p in parts})
                self.source = f"model weights from the pipeline layer files ({', '.join(dtypes)})"
            else:
                self.source = "fp32 master weights from the ZeRO-1 optimizer state of every pipeline stage"
            got = {n: sum(p.numel for p in parts) for n, parts in pieces.items()}
            _check_against_config(ref, got, {n: math.prod(s) for n, s in self.shapes.items()})
            self._pieces = pieces
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> TorchZip:
        z = TorchZip(path)
        self._files.append(z)
        return z

    def _from_optimizer(self, optim: dict[tuple[int, int], Path], names: dict[str, str]) -> dict[str, list[_Piece]] | None:
        """Our name (a stranger's keeps its own) -> its pieces in the fp32 partitions; None if the files lack that layout."""
        parallel = self.ref.run_config.get("parallel")
        stages = (parallel.get("pipeline_stages") if isinstance(parallel, dict) else None) or 1 + max(s for s, _ in optim)
        pieces: dict[str, list[_Piece]] = {}
        owner: dict[str, int] = {}  # the stage whose copy of a tied parameter is read
        for stage in range(stages):
            present = sorted(r for s, r in optim if s == stage)
            states = []
            for replica in present:
                z = self._open(optim[stage, replica])
                osd = z.obj.get("optimizer_state_dict") if isinstance(z.obj, dict) else None
                if not isinstance(osd, dict) or not {"param_slice_mappings", "single_partition_of_fp32_groups"} <= set(osd):
                    self.close()
                    return None
                states.append((z, osd))
            counts = states[0][1].get("partition_count") if states else None
            replicas = max(counts) if isinstance(counts, (list, tuple)) else int(counts or 0)
            if not states or present != list(range(replicas)):
                lost = sorted(set(range(replicas)) - set(present))
                which = f"replica(s) {', '.join(map(str, lost))} of stage {stage}" if lost else f"stage {stage}"
                raise ClovaError(
                    f"{self.ref.path}: partial checkpoint: the optimizer file(s) of {which} are missing; "
                    "export a complete step or copy the missing files back"
                )
            for z, osd in states:
                for flat, mapping in zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
                    for pname, frag in mapping.items():
                        ours = names.get(pname, pname)
                        if owner.setdefault(ours, stage) == stage:
                            pieces.setdefault(ours, []).append(_Piece(z, flat, int(_field(frag, "start")), int(_field(frag, "numel"))))
        return pieces

    def _from_layers(self, layers: dict[int, Path], names: list[dict[str, str]]) -> dict[str, list[_Piece]]:
        pieces: dict[str, list[_Piece]] = {}
        got: dict[str, tuple] = {}
        # A gap among the layer files is a lost file; files that stop early or run on belong to another model shape.
        holes = [i for i, own in enumerate(names) if own and i not in layers and i < max(layers)]
        if holes:
            raise ClovaError(
                f"{self.ref.path}: partial checkpoint: {', '.join(f'layer_{i:02d}-model_states.pt' for i in holes)} "
                "missing; export a complete step or copy the missing files back"
            )
        for i in sorted(layers):
            own = names[i] if i < len(names) else {}
            z = self._open(layers[i])
            for key, t in z.obj.items():
                ours = own.get(key, f"layer_{i:02d}:{key}")
                got[ours] = t.shape
                pieces[ours] = [_Piece(z, t, 0, t.numel())]
        _check_against_config(self.ref, got, {n: tuple(s) for n, s in self.shapes.items()})
        return pieces

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes.items():
            full = torch.empty(math.prod(shape), dtype=torch.float32)
            at = 0
            for p in self._pieces[name]:
                part = full[at : at + p.numel]
                if p.tensor.dtype == torch.float32:
                    p.file.read_into(p.tensor, p.start, part)
                else:
                    raw = torch.empty(p.numel, dtype=p.tensor.dtype)
                    p.file.read_into(p.tensor, p.start, raw)
                    part.copy_(raw)
                at += p.numel
            yield name, full.view(shape)

    def close(self) -> None:
        for z in getattr(self, "_files", []):
            z.close()
        self._files = []


READERS: dict[str, type] = {"zero3": Zero3Checkpoint, "pipeline": PipelineCheckpoint}


def open_checkpoint(ref: CheckpointRef) -> Consolidated:
    reader = READERS.get(ref.parallel)
    if reader is None:
        raise ClovaError(f"{ref.run_dir / RUN_CONFIG}: unknown 'parallel' {ref.parallel!r}; expected one of {', '.join(READERS)}")
    return reader(ref)


def consolidate_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict of a run's checkpoint (``tag``, else the latest), in our names.

    For small models; ``clova export`` streams instead.
    """
    ref = resolve_checkpoint(run_dir, "latest", tag=tag)
    ckpt = open_checkpoint(ref)
    try:
        return {n: t.clone() for n, t in ckpt.tensors()}
    finally:
        ckpt.close()

