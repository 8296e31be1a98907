"""A shard dir with no training document is an error that says why, not an empty dataset for `clova train` to trip on."""

from __future__ import annotations

from pathlib import Path

from clova_train.core.errors import ClovaError


def check_usable(report: dict, out_dir: Path) -> None:
    """Raise unless the run wrote at least one training document; the message gives the skips by reason."""
    train = report["split"]["train"]["documents"]
    if train:
        return
    read, skipped = report["documents_read"], report["skipped"]
    if not read:
        why = "the inputs hold no documents (empty files?)"
    elif skipped["total"]:
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in skipped["by_reason"].items())
        where = next((ex[0] for ex in skipped["examples"].values() if ex), None)
        why = f"all {read:,} document(s) read were skipped ({reasons}{'; e.g. ' + where if where else ''})"
    else:
        valid = report["split"]["valid"]["documents"]
        why = f"all {valid:,} document(s) went to the validation split; lower --valid-fraction or add text"
    raise ClovaError(f"{out_dir}: no training document written: {why}; fix the inputs and tokenize into a new --out")
