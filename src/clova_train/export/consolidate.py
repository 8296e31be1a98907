"""Consolidating a run's DeepSpeed checkpoint into our own parameter names.

Export never parses DeepSpeed's layout itself: it resolves a complete
checkpoint here and asks :mod:`clova_train.training.checkpoints.rankfiles` (which
resuming on another layout reads with too) for a :class:`Consolidated`
checkpoint, which knows every parameter's name (ours, as in ``model.GPT``)
and shape up front and then yields ``(name, fp32 tensor)`` one parameter at
a time. Everything downstream (the Hugging Face key map, the safetensors
writer, verification) is shared.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from clova_train.core.config import read_json_object
from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.training.checkpoints.checkpoint import damage
from clova_train.training.checkpoints.rankfiles import (  # noqa: F401  (export's names for them)
    READERS,
    CheckpointRef,
    Consolidated,
    PipelineCheckpoint,
    Zero3Checkpoint,
    empty_model,
    expected_shapes,
    open_checkpoint,
)
from clova_train.training.checkpoints.markers import read_markers
from clova_train.training.rundir import CHECKPOINT_DIR, CONFIG_FILE, LATEST_FILE, MARKER_FILE


# ---------------------------------------------------------------- run dir and tags


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


def _steps(tags: dict[str, dict]) -> str:
    return ", ".join(str(m.get("step")) for m in sorted(tags.values(), key=lambda m: m.get("step", -1))) or "none"


def resolve_checkpoint(run_dir: str | Path, step: int | str | None = "latest", *, tag: str | None = None) -> CheckpointRef:
    """The complete checkpoint for ``step`` (an int, or "latest"), or the one named ``tag``."""
    run_dir = Path(run_dir)
    run_cfg = read_run_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    tags = read_markers(ckpt_dir)[0]
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

    _check_files(ckpt_dir, tag, tags)
    parallel = run_cfg.get("parallel", "zero3")
    mode = parallel.get("mode", "zero3") if isinstance(parallel, dict) else str(parallel)
    # The checkpoint's own model (its marker's, since llama runs may extend their context in a later stage), else the run's.
    marker = tags[tag]
    model = (model_config(marker, str(ckpt_dir / tag / MARKER_FILE)) if isinstance(marker.get("model"), dict)
             else model_config(run_cfg, str(run_dir / CONFIG_FILE)))
    return CheckpointRef(run_dir, tag, marker, run_cfg, model, mode)



def _check_files(ckpt_dir: Path, tag: str, tags: dict[str, dict]) -> None:
    """Before anything opens a file of checkpoint ``tag``: resume's check (regular files, the sizes the marker
    recorded), and the fix when it fails. Missing files are left to the readers, which name the rank or stage."""
    why = damage(ckpt_dir / tag, tags[tag], missing=False)
    if why is None:
        return
    step = tags[tag].get("step", -1)
    older = [m.get("step", -1) for t, m in tags.items() if m.get("step", -1) < step and damage(ckpt_dir / t, m) is None]
    fix = (
        f"the newest intact one is step {max(older)}: `clova export --step {max(older)}` reads it, "
        f"`clova train --resume --resume-step {max(older)}` continues from it"
        if older else "no older checkpoint is intact: copy the run dir again from where it was written"
    )
    raise ClovaError(f"checkpoint {tag} is damaged ({why}); {fix}")


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

