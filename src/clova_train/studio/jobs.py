"""No-code p-tuning jobs and saved presets, kept in a state directory (`clova serve --state-dir DIR`).

The shared artifacts of the paper's Studio: a person uploads a train and a
validation file, a job p-tunes a prompt in the server process (a queue,
``workers`` jobs at a time), and the trained prompt is served under the
model name ``MODEL/ptune/JOB``. Everything lives under DIR and is read back
when the server starts again::

    DIR/jobs/JOB/job.json         the job: settings, status, accuracy per epoch
    DIR/jobs/JOB/train.tsv|jsonl  the uploaded files, template.json
    DIR/jobs/JOB/prompt/          the trained prompt (a `clova ptune` directory)
    DIR/presets/ID.json           presets saved from the playground

A job that was running when the server stopped is marked failed (its
partial state is not resumable); queued ones run again.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from clova_train.core.config import from_dict, load_json
from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json
from clova_train.core.lock import LOCK_FILE, DirLock
from clova_train.evaluation.prompts import PromptTemplate, load_template
from clova_train.evaluation.ptune import PTuneConfig, ptune
from clova_train.evaluation.tasks import get_task, read_examples
from clova_train.inference.presets import Preset
from clova_train.studio.codec import prompt_codec

JOB_FILE = "job.json"
SETTINGS = ("prompt_tokens", "encoder", "hidden_size", "epochs", "lr", "batch_size", "seed", "score")
"""The PTuneConfig fields a job's request may set."""
RECORD_KEYS = {"id", "name", "task", "status", "created", "finished", "config", "history", "served"}
log = logging.getLogger("clova.studio")


class Studio:
    """The state directory's jobs and presets, the job queue, and the trained prompts served by name."""

    def __init__(self, state_dir: str | Path, model, tok, model_name: str, presets: list[dict], *, workers: int = 1):
        if workers < 1:
            raise ClovaError(f"--ptune-jobs must be >= 1, not {workers}")
        self.dir = Path(state_dir)
        self.model, self.tok, self.model_name = model, tok, model_name
        self.lock = DirLock(self.dir / LOCK_FILE, "clova serve --state-dir")
        self.lock.acquire()
        (self.dir / "jobs").mkdir(exist_ok=True)
        (self.dir / "presets").mkdir(exist_ok=True)
        self.presets = presets
        self._mutex = threading.Lock()
        for path in sorted((self.dir / "presets").glob("*.json")):
            self._add_preset({"id": path.stem, "saved": True, **asdict(load_json(Preset, path))})
        self._jobs: dict[str, dict] = {}
        self._codecs: dict[str, tuple] = {}
        self._queue: queue.Queue = queue.Queue()
        for path in sorted((self.dir / "jobs").glob(f"*/{JOB_FILE}")):
            try:
                job = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(job, dict) or job.get("id") != path.parent.name or not RECORD_KEYS <= set(job):
                    raise ValueError(f"not a job record (needs {', '.join(sorted(RECORD_KEYS))})")
            except (ValueError, OSError) as e:
                log.warning("%s: skipped, unreadable (%s)", path, e)
                continue
            job["model"] = f"{model_name}/ptune/{job['id']}"  # the name this server gives it
            self._jobs[job["id"]] = job
            if job["status"] == "running":
                self._update(job, status="failed", error="the server stopped while this job ran; start a new one")
        for job in sorted(self._jobs.values(), key=lambda j: j["created"]):
            if job["status"] == "queued":
                self._queue.put(job["id"])
        self._threads = [threading.Thread(target=self._work, name=f"clova-ptune-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ jobs

    def create(self, spec: dict) -> dict:
        """Check and save a job (the uploaded files' text, a template or None, the settings) and queue it."""
        task = get_task(spec["task"])
        job_id = uuid.uuid4().hex[:8]
        d = self.dir / "jobs" / job_id
        d.mkdir(parents=True)
        try:
            files = {}
            for name in ("train", "valid"):
                files[name] = d / f"{name}{'.tsv' if task.tsv_columns else '.jsonl'}"
                files[name].write_text(spec[name], encoding="utf-8")
            if spec.get("template") is None:
                template = load_template(task)
            else:
                template = from_dict(PromptTemplate, spec["template"], where="template")
                template.check(task, "template")
            if not template.ptune_query:
                raise ClovaError("template: p-tuning needs a ptune_query with {prompt} marks where the trained vectors go")
            atomic_write_json(d / "template.json", asdict(template))
            settings = {k: spec[k] for k in SETTINGS if spec.get(k) is not None}
            cfg = PTuneConfig(task=task.name, train=str(files["train"]), valid=str(files["valid"]), out=str(d / "prompt"), template=str(d / "template.json"), **settings)
            counts = {}
            for name, path in files.items():
                try:
                    counts[name] = len(read_examples(task, path))
                except ClovaError as e:
                    raise ClovaError(str(e).replace(str(path), f"the {name} file")) from None
        except ClovaError:
            shutil.rmtree(d, ignore_errors=True)
            raise
        job = {
            "id": job_id,
            "name": spec.get("name") or f"{task.name} {job_id}",
            "task": task.name,
            "model": f"{self.model_name}/ptune/{job_id}",
            # A served prompt wraps a request's text, so only one-input tasks (not sts) are served by name.
            "served": len(task.inputs) == 1,
            "status": "queued",
            "created": time.time(),
            "started": None,
            "finished": None,
            "config": {k: v for k, v in asdict(cfg).items() if k in SETTINGS},
            "examples": counts,
            "progress": {"epoch": 0, "step": 0, "steps": counts["train"]},
            "zero_shot": None,
            "history": [],
            "best": None,
            "best_epoch": None,
            "error": None,
        }
        with self._mutex:
            self._jobs[job_id] = job
        self._update(job)
        self._queue.put(job_id)
        return job

    def list(self) -> list[dict]:
        with self._mutex:
            return [dict(j) for j in sorted(self._jobs.values(), key=lambda j: j["created"])]

    def get(self, job_id: str) -> dict | None:
        with self._mutex:
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def _update(self, job: dict, save: bool = True, **changes) -> None:
        with self._mutex:
            job.update(changes)
            if save:
                atomic_write_json(self.dir / "jobs" / job["id"] / JOB_FILE, job)

    def _work(self) -> None:
        # The server tokenizes requests on its one preparation thread with ``self.tok``; a job thread
        # tokenizes with a tokenizer of its own, as tokenizers' caches are not shared between threads.
        tok = self.tok.for_thread()
        while (job_id := self._queue.get()) is not None:
            self._run(self._jobs[job_id], tok)

    def _run(self, job: dict, tok) -> None:
        d = self.dir / "jobs" / job["id"]
        suffix = ".tsv" if get_task(job["task"]).tsv_columns else ".jsonl"
        cfg = PTuneConfig(
            task=job["task"], train=str(d / f"train{suffix}"), valid=str(d / f"valid{suffix}"), out=str(d / "prompt"),
            template=str(d / "template.json"), **job["config"],
        )  # fmt: skip
        self._update(job, status="running", started=time.time())

        def step(epoch: int, done: int, total: int) -> None:
            self._update(job, save=False, progress={"epoch": epoch, "step": done, "steps": total})

        def epoch(entry: dict) -> None:
            self._update(job, history=[*job["history"], entry])

        try:
            report = ptune(self.model, tok, cfg, model_name=self.model_name, show_progress=False, on_epoch=epoch, on_step=step)
        except Exception as e:  # noqa: BLE001 - the job fails with its reason; the server serves on
            if not isinstance(e, ClovaError):
                log.exception("p-tuning job %s failed", job["id"])
            self._update(job, status="failed", finished=time.time(), error=str(e) if isinstance(e, ClovaError) else f"{type(e).__name__}: {e}")
            return
        self._update(job, status="done", finished=time.time(), zero_shot=report["zero_shot"], best=report["best"], best_epoch=report["best_epoch"])

    # ------------------------------------------------------------ trained prompts served by name

    def resolve(self, model: str):
        """(embed, encode) of the finished job whose prompt ``model`` names, else None."""
        prefix = f"{self.model_name}/ptune/"
        job = self.get(model[len(prefix) :]) if model.startswith(prefix) else None
        if job is None or job["status"] != "done" or not job["served"]:
            return None
        with self._mutex:
            if job["id"] not in self._codecs:
                self._codecs[job["id"]] = prompt_codec(self.model, self.tok, self.dir / "jobs" / job["id"] / "prompt")
            return self._codecs[job["id"]]

    def model_cards(self) -> list[dict]:
        return [
            {"id": j["model"], "object": "model", "created": int(j["finished"]), "owned_by": "clova-train studio",
             "context_length": self.model.cfg.block_size, "task": j["task"], "job": j["id"], "name": j["name"]}
            for j in self.list() if j["status"] == "done" and j["served"]
        ]  # fmt: skip

    # ------------------------------------------------------------ presets

    def save_preset(self, preset: Preset) -> dict:
        """A playground prompt and its settings, saved as DIR/presets/ID.json and listed with the shipped ones."""
        preset_id = re.sub(r"[^\w-]+", "-", preset.name.strip()).strip("-")[:64] or "preset"
        shipped = {p["id"] for p in self.presets if not p.get("saved")}
        if preset_id in shipped:
            preset_id = f"my-{preset_id}"
        atomic_write_json(self.dir / "presets" / f"{preset_id}.json", asdict(preset))
        entry = {"id": preset_id, "saved": True, **asdict(preset)}
        self._add_preset(entry)
        return entry

    def _add_preset(self, entry: dict) -> None:
        with self._mutex:
            self.presets[:] = [p for p in self.presets if p["id"] != entry["id"]] + [entry]

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        self.lock.release()
