"""DeepSpeed rank files seen as our own parameters: fp32 master weights and Adam moments, one parameter at a time.

There is one reader per parallel mode, used by export (the weights, under
our names, for the Hugging Face writer) and by resuming on another layout
(weights and optimizer moments, re-sharded into a new engine). Neither ever
parses DeepSpeed's layout elsewhere.

Memory stays near the size of the largest parameter: the ranks' optimizer
files are never loaded. Their pickled structure is read with the tensors
left on disk (:class:`TorchZip`), and each parameter's slices are read from
each rank's partition straight into one buffer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from clova_train.core.safe_pickle import check_torch_file
from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import GPT
from clova_train.training.rundir import CHECKPOINT_DIR, CONFIG_FILE
from clova_train.training.checkpoints.torchzip import OnDisk, TorchZip, _zero_stage


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



# ---------------------------------------------------------------- one reader per parallel mode


class Consolidated(Protocol):
    """A checkpoint seen as our own parameters, one at a time."""

    shapes: dict[str, torch.Size]
    """Our parameter names and shapes, in the order ``tensors`` yields them."""
    source: str
    """Where the weights come from, for the model card ("fp32 master weights from the optimizer state")."""

    def tensors(self, key: str = "fp32") -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, full fp32 tensor) of the master weights ("fp32") or of an Adam moment ("exp_avg", "exp_avg_sq")."""
        ...

    def read_range(self, name: str, key: str, start: int, count: int) -> torch.Tensor:
        """Elements ``start .. start + count`` of parameter ``name`` (flattened), fp32: a new partition's share, read alone."""
        ...

    def adam_step(self) -> int:
        """The optimizer's step count (Adam's bias correction)."""
        ...

    def close(self) -> None: ...


def empty_model(cfg: ModelConfig) -> GPT:
    """Our GPT on the meta device: names and shapes, no memory, no initialisation (building draws nothing; see GPT)."""
    with torch.device("meta"):
        return GPT(cfg)


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


class _RankFiles:
    """What the readers share: whole tensors from ranges, and closing the files."""

    shapes: dict[str, torch.Size]
    _files: list[TorchZip]

    def read_range(self, name: str, key: str, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self, key: str = "fp32") -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes.items():
            yield name, self.read_range(name, key, 0, math.prod(shape)).view(shape)

    def close(self) -> None:
        for z in getattr(self, "_files", []):
            z.close()
        self._files = []


_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


class Zero3Checkpoint(_RankFiles):
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
        self._where: dict[str, tuple[int, int, int]] = {}  # our name -> (group, offset in each rank's flat group, numel)
        for g, shapes in enumerate(group_shapes):
            offset = 0
            for n, shape in shapes.items():
                self._where[self._ours[n]] = (g, offset, math.prod(shape))
                offset += math.ceil(math.prod(shape) / world)
        for g, shapes in enumerate(group_shapes):
            used = sum(math.ceil(math.prod(s) / world) for s in shapes.values())
            for r, flat in enumerate(self._flat):
                if flat[g].numel() != used:
                    raise ClovaError(
                        f"{ref.path}: rank {r} group {g} holds {flat[g].numel()} fp32 elements, the shapes need "
                        f"{used}; the files come from different saves or a newer DeepSpeed layout"
                    )

    def _state(self, z: TorchZip, group: int, key: str) -> OnDisk:
        try:
            return z.obj["optimizer_state_dict"]["optimizer_state_dict"]["state"][group][key]
        except (KeyError, TypeError, IndexError):
            raise ClovaError(f"{z.path}: its optimizer state has no {key!r} for group {group}; not an Adam checkpoint of clova train") from None

    def adam_step(self) -> int:
        t = self._state(self._files[0], 0, "step")
        step = torch.empty(1, dtype=t.dtype)
        self._files[0].read_into(t, 0, step)
        return int(step.item())

    def _flats(self, key: str) -> list[list[OnDisk]]:
        """Per rank, per group: the flat partition holding ``key``."""
        if key == "fp32":
            return self._flat
        return [[self._state(z, g, key) for g in range(len(self._groups))] for z in self._files]

    def read_range(self, name: str, key: str, start: int, count: int) -> torch.Tensor:
        g, offset, n = self._where[name]
        part = math.ceil(n / self.world)  # rank r holds elements [r * part, (r + 1) * part) at ``offset`` of its flat group
        flats = self._flats(key)
        out = torch.empty(count, dtype=torch.float32)
        at = start
        while at < start + count:
            r, k = divmod(at, part)
            take = min(part - k, start + count - at)
            self._files[r].read_into(flats[r][g], offset + k, out[at - start : at - start + take])
            at += take
        return out

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


@dataclass(frozen=True)
class _Piece:
    """Consecutive elements of one parameter, stored in a torch.save file."""

    file: TorchZip
    tensor: OnDisk
    start: int
    """Elements from the start of ``tensor``."""
    numel: int
    moments: dict | None = None
    """The Adam state of ``tensor``'s group ("exp_avg", "exp_avg_sq": laid out like it; "step"); None in layer files."""


def _field(obj, name: str):
    """A field of a small DeepSpeed record (e.g. fragment_address), unpickled as _Opaque or as itself."""
    state = getattr(obj, "state", None)
    return state[name] if isinstance(state, dict) and name in state else getattr(obj, name)


class PipelineCheckpoint(_RankFiles):
    """A pipeline checkpoint (DeepSpeed PipelineModule, ZeRO stage 0 or 1) under our names.

    Each stage's ZeRO-1 optimizer file (``zero_pp_rank_<replica>_mp_rank_<stage>``)
    holds, per parameter group, that replica's slice of the stage's flat fp32
    master weights, and ``param_slice_mappings`` says where each parameter's
    part of the slice lies, by PipelineModule name; a parameter's parts in
    replica order make it whole. :func:`~clova_train.training.parallel.pipeline.pipeline_names` turns those
    names into ours; the tied embedding appears on the first and the last
    stage alike, and the first stage's copy is read. Without such optimizer
    files (ZeRO-0 in fp32, or an older DeepSpeed) the weights come from the
    layer files (``layer_<i>-model_states.pt``, in the training precision),
    named by :func:`~clova_train.training.parallel.pipeline.pipeline_layer_names`.
    """

    def __init__(self, ref: CheckpointRef):
        from clova_train.training.parallel.pipeline import pipeline_layer_names, pipeline_names

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
                base = (osd.get("base_optimizer_state") or {}).get("state") or {}
                for g, (flat, mapping) in enumerate(zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"])):
                    for pname, frag in mapping.items():
                        ours = names.get(pname, pname)
                        if owner.setdefault(ours, stage) == stage:
                            piece = _Piece(z, flat, int(_field(frag, "start")), int(_field(frag, "numel")), base.get(g))
                            pieces.setdefault(ours, []).append(piece)
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

    def _moment(self, p: _Piece, key: str) -> OnDisk:
        if not isinstance(p.moments, dict) or not isinstance(p.moments.get(key), OnDisk):
            raise ClovaError(f"{p.file.path}: holds no Adam {key!r} (weights only); resume on the layout that wrote it")
        return p.moments[key]

    def adam_step(self) -> int:
        first = next(iter(self._pieces.values()))[0]
        t = self._moment(first, "step")
        step = torch.empty(1, dtype=t.dtype)
        first.file.read_into(t, 0, step)
        return int(step.item())

    def read_range(self, name: str, key: str, start: int, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=torch.float32)
        at = 0  # where the current piece starts in the parameter
        for p in self._pieces[name]:
            lo, hi = max(start, at), min(start + count, at + p.numel)
            if lo < hi:
                src = p.tensor if key == "fp32" else self._moment(p, key)
                part = out[lo - start : hi - start]
                if src.dtype == torch.float32:
                    p.file.read_into(src, p.start + lo - at, part)
                else:
                    raw = torch.empty(hi - lo, dtype=src.dtype)
                    p.file.read_into(src, p.start + lo - at, raw)
                    part.copy_(raw)
            at += p.numel
        return out



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
    for path in sorted(ref.path.glob("*.pt")):  # also the files this reader skips: a checkpoint asking for code is refused whole
        check_torch_file(path, only_code=True)
    return reader(ref)
