"""Completion markers, read in one place: a checkpoint counts once its marker (written last, atomically) exists.

A marker is JSON and holds what resuming and export need without unpickling
anything: the step, tokens, the layout, the sampler position, each file's size.
"""

from __future__ import annotations

import json
from pathlib import Path

from clova_train.training.rundir import CHECKPOINT_DIR, MARKER_FILE


def read_markers(ckpt_dir: Path) -> tuple[dict[str, dict], set[str]]:
    """tag -> marker of every complete checkpoint under ``ckpt_dir``; and the tags whose marker exists but did not read."""
    out, unread = {}, set()
    if ckpt_dir.is_dir():
        for path in ckpt_dir.glob(f"step_*/{MARKER_FILE}"):
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                int(info["step"])
                out[path.parent.name] = info
            except (OSError, ValueError, KeyError, TypeError):
                unread.add(path.parent.name)  # written atomically, so complete; only the read failed
    return out, unread


def complete_steps(markers: dict[str, dict]) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints ``markers`` describes, oldest first."""
    return sorted((int(m["step"]), tag) for tag, m in markers.items())


def read_marker(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / MARKER_FILE).read_text(encoding="utf-8"))


def newest_checkpoint(run_dir: Path) -> dict | None:
    """The completion marker of the newest complete checkpoint of a run dir, or None."""
    markers, _ = read_markers(run_dir / CHECKPOINT_DIR)
    steps = complete_steps(markers)
    return markers[steps[-1][1]] if steps else None
