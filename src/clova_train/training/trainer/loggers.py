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
        events += [(k, v, step) for k, v in record.items() if k.startswith("eval/") and v is not None]
        self.monitor.write_events(events)


# ------------------------------------------------------------------ experiment trackers

TRACKERS_FILE = "trackers.json"
"""RUN_DIR/trackers.json: each tracker's run id, so a resumed run continues the same tracker run."""


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 3e-3}} -> {"train.lr": 3e-3}: the resolved config as a tracker's flat parameters."""
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TrackerBackend(MetricsBackend):
    """A tracker that must never stop the run: the first failure (no network, bad URI, a full disk) is one warning
    line and the tracker is off for the rest of the run; metrics.jsonl keeps everything."""

    def __init__(self, run_dir: Path, warn):
        self.run_dir, self.warn = run_dir, warn
        self.ok = True
        self._logged: set[str] = set()

    def _guarded(self, fn, *args) -> None:
        if not self.ok:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any tracker error, from any library, is one line and not a crash
            self.ok = False
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.warn(f"warning: {self.name} is off for the rest of this run ({type(e).__name__}: {first[:300]}); "
                      f"the run goes on and metrics.jsonl has every metric")

    def _ids(self) -> dict:
        path = self.run_dir / TRACKERS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _keep_id(self, run_id: str) -> None:
        ids = self._ids()
        if ids.get(self.name) != run_id:
            atomic_write_text(self.run_dir / TRACKERS_FILE, json.dumps({**ids, self.name: run_id}, indent=1) + "\n")

    @staticmethod
    def _metrics(record: dict) -> dict:
        return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}

    def log(self, record: dict) -> None:
        self._logged = set(record)
        self._guarded(self._write, record["step"], self._metrics(record))

    def amend(self, record: dict) -> None:
        # Only the fields the save added: a tracker appends, it cannot rewrite the step it already has.
        new = {k: v for k, v in record.items() if k not in self._logged}
        self._logged |= set(new)
        if new:
            self._guarded(self._write, record["step"], self._metrics(new))

    def close(self) -> None:
        self._guarded(self._finish)

    def _write(self, step: int, metrics: dict) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


class WandbBackend(TrackerBackend):
    """Weights & Biases (--wandb PROJECT): one W&B run per clova run, its id kept in RUN_DIR/trackers.json.

    Offline (WANDB_MODE=offline) it writes RUN_DIR/wandb/offline-run-*; `wandb sync` uploads them later. The
    x-axis is our optimizer step (a metric of its own): W&B's internal step only grows, so steps a killed attempt
    logged after its last checkpoint and the rerun logs again both stay, in the order they were logged.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, warn, *, project: str, entity: str | None, run_name: str | None):
        super().__init__(run_dir, warn)
        self.run = None
        self._guarded(self._start, config, project, entity, run_name)

    def _start(self, config: dict, project: str, entity: str | None, run_name: str | None) -> None:
        import uuid

        import wandb

        run_id = self._ids().get(self.name) or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, entity=entity, name=run_name or self.run_dir.name, id=run_id, resume="allow",
                              dir=str(self.run_dir), config=config, settings=wandb.Settings(console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._keep_id(run_id)

    def _write(self, step: int, metrics: dict) -> None:
        self.run.log({"step": step, **metrics})

    def _finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowBackend(TrackerBackend):
    """MLflow (--mlflow URI): a tracking server, or a local ``file:`` store that needs none. One MLflow run in
    experiment EXPERIMENT (default "clova-train"), its id kept in RUN_DIR/trackers.json; the resolved config is
    the run's parameters (MLflow's are write-once: a resume adds the new ones and keeps the first values)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, warn, *, uri: str, experiment: str = "clova-train"):
        super().__init__(run_dir, warn)
        self.client = self.run_id = None
        self._guarded(self._start, config, uri, experiment)

    def _start(self, config: dict, uri: str, experiment: str) -> None:
        import os

        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store in maintenance mode behind this switch; the file store is what needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = self._ids().get(self.name)
        if self.run_id is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
            self.run_id = client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
        else:
            client.update_run(self.run_id, status="RUNNING")
        have = client.get_run(self.run_id).data.params
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(config).items() if k not in have]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(self.run_id, params=[Param(p.key, p.value[:6000]) for p in params[i:i + 100]])
        self._keep_id(self.run_id)

    def _write(self, step: int, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _finish(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)


def open_trackers(run_dir: Path, config: dict, warn, *, wandb: str | None = None, wandb_entity: str | None = None,
                  wandb_run_name: str | None = None, mlflow: str | None = None) -> list[MetricsBackend]:
    """The trackers a run asked for, each already started (or off after one warning line)."""
    trackers: list[MetricsBackend] = []
    if wandb:
        trackers.append(WandbBackend(run_dir, config, warn, project=wandb, entity=wandb_entity, run_name=wandb_run_name))
    if mlflow:
        trackers.append(MlflowBackend(run_dir, config, warn, uri=mlflow))
    return trackers
