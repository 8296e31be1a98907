"""Where a run's metrics go: one small interface (:class:`MetricsBackend`), so a new tracker is one class.

The loop logs one record per optimizer step to a :class:`~clova_train.training.trainer.metrics.MetricsLogger`,
which hands it to each backend: metrics.jsonl and TensorBoard today.
"""

from __future__ import annotations

import json
from pathlib import Path

from clova_train.core.files import atomic_write_text
from clova_train.core.textfiles import iter_jsonl


class MetricsBackend:
    """One destination of the metrics; every method but :meth:`log` may be left as is."""

    name = "backend"

    def resume_at(self, step: int) -> list[dict]:
        """The run resumes after ``step``: drop what a later, interrupted attempt logged; return the kept records if stored."""
        return []

    def log(self, record: dict) -> None:
        """One optimizer step's record: finite floats or None, as in metrics.jsonl."""
        raise NotImplementedError

    def amend(self, record: dict) -> None:
        """The last step's record gained fields (a save's cost, known only after the step was logged)."""

    def close(self) -> None:
        """The run ends on this rank."""


class JsonlBackend(MetricsBackend):
    """RUN_DIR/metrics.jsonl, one object per optimizer step."""

    name = "metrics.jsonl"

    def __init__(self, path: Path):
        self.path = path
        self._last_at = 0

    def resume_at(self, step: int) -> list[dict]:
        logged = iter_jsonl(self.path, skip_bad=True) if self.path.is_file() else ()
        records = [rec for _, rec in logged if rec.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            self._last_at = f.tell()
            f.write(json.dumps(record) + "\n")

    def amend(self, record: dict) -> None:
        with open(self.path, "r+", encoding="utf-8") as f:
            f.truncate(self._last_at)  # rewriting one line, not the file: metrics.jsonl grows with the run
            f.seek(self._last_at)
            f.write(json.dumps(record) + "\n")


class TensorBoardBackend(MetricsBackend):
    """TensorBoard events through DeepSpeed's monitor (RUN_DIR/tensorboard)."""

    name = "tensorboard"
    TRAIN = ("loss", "lr", "grad_norm", "tokens_per_s")
    VALID = ("valid_loss", "valid_ppl")

    def __init__(self, monitor):
        self.monitor = monitor

    def log(self, record: dict) -> None:
        step = record["step"]
        events = [(f"Train/{k}", record[k], step) for k in self.TRAIN if record.get(k) is not None]
        events += [(f"Valid/{k[6:]}", record[k], step) for k in self.VALID if record.get(k) is not None]
        self.monitor.write_events(events)
