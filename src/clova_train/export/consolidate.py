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

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from clova_train.core.config import read_json_object
from clova_train.core.errors import ClovaError
from clova_train.model.gpt import GPT
from clova_train.model.config import ModelConfig

from clova_train.training.rundir import CHECKPOINT_DIR, CONFIG_FILE, LATEST_FILE, MARKER_FILE
from clova_train.export.torchzip import OnDisk, TorchZip, _zero_stage


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
    """The parallel mode that wrote it: "zero1", "zero2", "zero3" or "pipeline"."""

    @property
    def path(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR / self.tag

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
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise ClovaError(f"{run_dir}: no such run directory; pass the directory `clova train` wrote")
    if not path.is_file():
        raise ClovaError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); pass the directory `clova train` wrote")
    cfg = read_json_object(path)
    if "model" not in cfg:
        raise ClovaError(f"{path}: has no 'model' section; pass the directory `clova train` wrote")
    return cfg


def model_config(run_cfg: dict, where: str) -> ModelConfig:
    from clova_train.core.config import from_dict

    return from_dict(ModelConfig, run_cfg["model"], where=f"{where} 'model'")


def _complete_tags(ckpt_dir: Path) -> dict[str, dict]:
    """tag -> completion marker, for every checkpoint that finished writing."""
    out = {}
    for marker in ckpt_dir.glob(f"*/{MARKER_FILE}"):
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
    ckpt_dir = run_dir / CHECKPOINT_DIR
    tags = _complete_tags(ckpt_dir) if ckpt_dir.is_dir() else {}
    started = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
    if not tags:
        if started:
            raise ClovaError(
                f"{run_dir}: no complete checkpoint ({', '.join(started)} lack {MARKER_FILE}, so they were still being "
                "written when training stopped); resume training until it saves one"
            )
        raise ClovaError(f"{run_dir}: has no checkpoints (nothing under {CHECKPOINT_DIR}/); train with `clova train` first")

    if tag is None:
        if step is None or str(step) == "latest":
            latest = ckpt_dir / LATEST_FILE
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
                why = f" ({incomplete[0]} lacks {MARKER_FILE}: it was not finished)" if incomplete else ""
                raise ClovaError(f"{run_dir}: no complete checkpoint at step {n}{why}; complete steps: {_steps(tags)}")
            tag = found[0]
    elif tag not in tags:
        what = "is incomplete (no " + MARKER_FILE + ")" if (ckpt_dir / tag).is_dir() else "does not exist"
        raise ClovaError(f"{run_dir}: checkpoint {tag!r} {what}; complete steps: {_steps(tags)}")

    parallel = run_cfg.get("parallel", "zero3")
    mode = parallel.get("mode", "zero3") if isinstance(parallel, dict) else str(parallel)
    return CheckpointRef(run_dir, tag, tags[tag], run_cfg, model_config(run_cfg, str(run_dir / CONFIG_FILE)), mode)


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
        f"{ref.path}: checkpoint does not match {ref.run_dir / CONFIG_FILE} (n_layer={m.n_layer}, "
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
        from clova_train.training.pipeline import pipeline_layer_names, pipeline_names

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


class Zero12Checkpoint(PipelineCheckpoint):
    """A ZeRO-1 or ZeRO-2 checkpoint: one "stage" whose optimizer files hold the data-parallel slices of the fp32 masters.

    The layout is the pipeline's ZeRO-1 one (``single_partition_of_fp32_groups``
    with ``param_slice_mappings``), named by GPT's own parameter names, so the
    same piece reader assembles it; under bf16 the files are DeepSpeed's
    BF16_Optimizer's (``bf16_zero_pp_rank_*``), with the same fields.
    """

    source = "fp32 master weights from the ZeRO-1/2 optimizer state"

    def __init__(self, ref: CheckpointRef):
        self.ref = ref
        self._files = []
        optim = {}
        for p in ref.path.iterdir():
            if (m := _RANK_FILE.match(p.name)) and m.group(3) == "optim":
                if int(m.group(2)) != 0:
                    raise ClovaError(f"{p}: tensor-parallel checkpoints (mp_rank > 0) are not supported by export")
                optim[0, int(m.group(1))] = p
        if not optim:
            raise ClovaError(f"{ref.path}: no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt); is config.json's 'parallel' right?")
        self.shapes = expected_shapes(ref.model)
        try:
            pieces = self._from_optimizer(optim, {})
            if pieces is None:
                raise ClovaError(f"{ref.path}: the optimizer files lack DeepSpeed's ZeRO-1/2 fields (param_slice_mappings); a newer DeepSpeed layout?")
            # The engine wraps GPT itself, so the mappings already use our names.
            got = {n: sum(piece.numel for piece in parts) for n, parts in pieces.items()}
            _check_against_config(ref, got, {n: math.prod(s) for n, s in self.shapes.items()})
            self._pieces = pieces
        except BaseException:
            self.close()
            raise


READERS: dict[str, type] = {"zero1": Zero12Checkpoint, "zero2": Zero12Checkpoint, "zero3": Zero3Checkpoint, "pipeline": PipelineCheckpoint}


def open_checkpoint(ref: CheckpointRef) -> Consolidated:
    reader = READERS.get(ref.parallel)
    if reader is None:
        raise ClovaError(f"{ref.run_dir / CONFIG_FILE}: unknown 'parallel' {ref.parallel!r}; expected one of {', '.join(READERS)}")
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

