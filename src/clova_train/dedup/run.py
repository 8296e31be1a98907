"""`clova dedup` orchestration: the stages on datatrove's local or Slurm executor, resume, and the manifest.

The number of tasks of every stage is fixed by the inputs (one per input
file) and the settings (bands, line partitions), never by ``workers``, and
each task's output depends only on its own input and the earlier stages,
so the output is byte-identical for any worker count or machine count. A
rerun of the same command skips the tasks datatrove marked complete and
redoes the rest; a run with other inputs or settings is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from datatrove.pipeline.base import PipelineStep

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, file_sha256, fsync_path
from clova_train.core.lock import LOCK_FILE, dir_lock
from clova_train.core.progress import progress_bar
from clova_train.dedup.config import DedupConfig
from clova_train.dedup.stages import (
    BoilerplateStep,
    ClusterStep,
    CountLinesStep,
    KoreanSignature,
    ReadStep,
    WriteStep,
    count_pairs,
    minhash_config,
    part_name,
    read_jsonl_zst,
    write_jsonl_zst,
)
from clova_train.text.quality import REASONS, QualityRecipe, load_recipe
from clova_train.text.readers import DEDUP_FORMAT, MANIFEST_NAME, check_inputs, input_size

MANIFEST_VERSION = 1
WORK = ".work"
SAMPLES = "samples.jsonl"
DUPLICATES = "duplicates.jsonl.zst"


@dataclasses.dataclass
class SlurmOptions:
    """Where the stages run on a Slurm cluster (datatrove's SlurmPipelineExecutor submits one array job per stage)."""

    partition: str
    """Slurm partition of every stage's jobs."""
    time: str = "24:00:00"
    """Time limit of each job."""
    cpus_per_task: int = 1
    """CPUs per datatrove task (more gives a task more memory)."""
    mem_per_cpu_gb: int = 4
    """Memory per CPU in GB."""
    venv_path: str | None = None
    """A virtual environment each job activates (default: the one running this command)."""

    def __post_init__(self):
        for flag, value in (("--slurm-cpus-per-task", self.cpus_per_task), ("--slurm-mem-per-cpu", self.mem_per_cpu_gb)):
            if value < 1:
                raise ClovaError(f"{flag} must be at least 1, not {value}")


def _stages(paths: list[str], work: Path, out_dir: Path, cfg: DedupConfig, recipe: QualityRecipe) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of every stage, in order."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    w, n = str(work), len(paths)
    return [
        ("read", [ReadStep(w, paths, input_names(paths), cfg, recipe)], n),
        ("count", [CountLinesStep(w, n, recipe)], cfg.line_partitions),
        ("signature", [BoilerplateStep(w, cfg, recipe), KoreanSignature(w, cfg)], n),
        ("buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=minhash_config(cfg))], cfg.bands),
        ("cluster", [ClusterStep(w, n, cfg)], 1),
        ("write", [WriteStep(w, str(out_dir), cfg)], n),
    ]


def input_names(paths: list[str]) -> list[str]:
    """Each input named relative to the inputs' common folder: generated ids (``NAME:line N``) and so the output
    bytes stay the same wherever the corpus sits."""
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(common).as_posix() for p in resolved]


def _quiet_local():
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.utils.logging import logger

    class QuietLocal(LocalPipelineExecutor):
        """datatrove's local executor with each task's log in its file only (the console shows our progress bar)."""

        def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    return super()._run_for_rank(rank, local_rank, node_rank)
            finally:
                logger.remove()

    return QuietLocal, logger


def fingerprint(paths: list[Path], cfg: DedupConfig, recipe: QualityRecipe) -> dict:
    """What the output depends on; a rerun must match it to resume."""
    return {
        "config": cfg.result_keys(),
        "recipe": dataclasses.asdict(recipe),
        "inputs": [[str(p), input_size(p), p.stat().st_mtime_ns] for p in paths],
        "clova_version": __version__,
    }


def _differences(old: dict, new: dict) -> str:
    """The settings two fingerprints differ in, each with both values."""
    diffs = []
    for section in ("config", "recipe"):
        a, b = old.get(section) or {}, new.get(section) or {}
        diffs += [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    diffs += [k for k in ("inputs", "clova_version") if old.get(k) != new.get(k)]
    return ", ".join(diffs[:4]) or "settings"


def _prepare(out_dir: Path, fp: dict) -> dict | None:
    """The finished manifest when ``out_dir`` already holds this run; else make the work dir ready."""
    manifest = out_dir / MANIFEST_NAME
    work = out_dir / WORK
    if manifest.is_file():
        done = json.loads(manifest.read_text(encoding="utf-8"))
        if done.get("fingerprint") == fp:
            return done
        raise ClovaError(f"{out_dir}: holds a finished dedup of other inputs or settings ({_differences(done.get('fingerprint') or {}, fp)}); "
                         "choose another --out or delete it")
    if (work / "fingerprint.json").is_file():
        old = json.loads((work / "fingerprint.json").read_text(encoding="utf-8"))
        if old == fp:
            return None
        if any((work / "logs").glob("*/completions/*")):
            raise ClovaError(
                f"{out_dir}: holds an unfinished dedup with other settings ({_differences(old, fp)}); "
                f"rerun that command to finish it, or delete {out_dir}"
            )
        shutil.rmtree(work)  # no task of it finished (it failed at once): nothing to keep, start over
    if out_dir.exists() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        raise ClovaError(f"{out_dir}: exists and is not a `clova dedup` output; choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "fingerprint.json", fp)
    return None


def dedup_corpus(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: DedupConfig,
    recipe: QualityRecipe | str | Path | None = None,
    *,
    show_progress: bool = True,
    slurm: SlurmOptions | None = None,
) -> dict:
    """Remove near-duplicates and low-quality documents from ``inputs`` into ``out_dir``; resume an interrupted run."""
    t0 = time.perf_counter()
    paths = check_inputs(list(inputs))
    recipe = recipe if isinstance(recipe, QualityRecipe) else load_recipe(recipe)
    out_dir = Path(out_dir)
    with dir_lock(out_dir, "clova dedup", note=lambda line: print(line, file=sys.stderr)):
        return _dedup_locked(paths, out_dir, cfg, recipe, show_progress=show_progress, slurm=slurm, t0=t0)


def _dedup_locked(paths: list[Path], out_dir: Path, cfg: DedupConfig, recipe: QualityRecipe, *, show_progress: bool,
                  slurm: SlurmOptions | None, t0: float) -> dict:
    """dedup_corpus as the one writer of ``out_dir`` (with Slurm: while the jobs are submitted)."""
    fp = fingerprint(paths, cfg, recipe)
    done = _prepare(out_dir, fp)
    if done is not None:
        return _report(done, out_dir, 0.0, complete=True)
    work = out_dir / WORK
    stages = _stages([str(p) for p in paths], work, out_dir, cfg, recipe)
    if slurm is not None:
        return _submit_slurm(stages, work, out_dir, slurm)
    workers = cfg.workers or os.cpu_count() or 1
    local, logger = _quiet_local()
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with progress_bar("dedup", sum(t for _, _, t in stages), enabled=show_progress) as advance:
        for name, pipeline, tasks in stages:
            logger.remove()
            ex = local(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(work / "logs" / name), start_method=start)
            if ex.workers > 1:
                ex.run()
            else:  # in this process, without the manager process datatrove starts for its pool
                for rank in ex.get_incomplete_ranks():
                    ex._run_for_rank(rank)
            advance(tasks)
    manifest = finish(work, out_dir)
    return _report(manifest, out_dir, time.perf_counter() - t0, complete=False)


def _submit_slurm(stages: list, work: Path, out_dir: Path, s: SlurmOptions) -> dict:
    from datatrove.executor.slurm import SlurmPipelineExecutor

    venv = s.venv_path or (sys.prefix if sys.prefix != sys.base_prefix else None)
    prev = None
    stages = stages + [("finish", [FinishStep(str(work), str(out_dir))], 1)]
    for name, pipeline, tasks in stages:
        prev = SlurmPipelineExecutor(
            pipeline,
            tasks=tasks,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb,
            job_name=f"clova-dedup-{name}",
            logging_dir=str(work / "logs" / name),
            slurm_logs_folder=str(work / "slurm_logs" / name),
            venv_path=venv,
            depends=prev,
        )
    try:
        prev.run()  # submits the whole chain, each job depending on the one before
    except FileNotFoundError:
        raise ClovaError("--slurm-partition needs Slurm's sbatch on PATH: run this on the cluster's login node") from None
    except subprocess.CalledProcessError as e:
        raise ClovaError(f"sbatch refused a dedup stage (exit {e.returncode}); see the message above and {work / 'slurm_logs'}") from None
    return {"submitted": True, "out": str(out_dir), "stages": [n for n, _, _ in stages], "already_complete": False}


class FinishStep(PipelineStep):
    """The last stage on a cluster: the manifest, as :func:`dedup_corpus` writes it locally."""

    name = "clova manifest"
    type = "clova"

    def __init__(self, work: str, out_dir: str):
        super().__init__()
        self.work, self.out_dir = Path(work), Path(out_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # The logs stay: datatrove's stats-merging jobs may still be queued behind any stage (they read logs/),
        # Slurm writes their output under slurm_logs/ (a job whose output dir is gone FAILS), and users read both.
        finish(self.work, self.out_dir, keep=("logs", "slurm_logs"))


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def finish(work: Path, out_dir: Path, *, keep: tuple[str, ...] = ()) -> dict:
    """Join the tasks' counts and samples into manifest.json (written last), then drop the work dir but ``keep``."""
    fp = _load(work / "fingerprint.json")
    cfg = fp["config"]
    n = len(fp["inputs"])
    inputs, parts, samples = [], [], {}
    totals = {"documents_read": 0, "documents_kept": 0, "documents_removed": 0, "removed": {}, "boilerplate_lines_stripped": 0}
    for r in range(n):
        read, filt, written = (_load(work / d / f"{r:05d}.json") for d in ("read", "filtered", "written"))
        removed: dict[str, int] = dict(read["reader_skips"]["by_reason"])
        for part in (read["removed"], filt["removed"], written["removed"]):
            for reason, c in part["counts"].items():
                removed[reason] = removed.get(reason, 0) + c
            for reason, recs in part["samples"].items():
                samples.setdefault(reason, []).extend(recs)
        n_removed = sum(removed.values())
        if read["documents_read"] != written["kept"] + n_removed:  # an internal invariant, not a user error
            raise AssertionError(f"{read['path']}: read {read['documents_read']} != kept {written['kept']} + removed {n_removed}")
        part = out_dir / part_name(r)
        parts.append({"name": part.name, "documents": written["kept"], "bytes": part.stat().st_size, "sha256": file_sha256(part)})
        inputs.append(
            {
                "path": read["path"],
                "bytes": read["bytes"],
                "sha256": read["sha256"],
                "documents_read": read["documents_read"],
                "documents_kept": written["kept"],
                "documents_removed": n_removed,
                "removed": dict(sorted(removed.items())),
                "skipped_examples": read["reader_skips"]["examples"],
                "part": part.name,
            }
        )
        totals["documents_read"] += read["documents_read"]
        totals["documents_kept"] += written["kept"]
        totals["documents_removed"] += n_removed
        totals["boilerplate_lines_stripped"] += filt["lines_stripped"]
        for reason, c in removed.items():
            totals["removed"][reason] = totals["removed"].get(reason, 0) + c
    totals["removed"] = dict(sorted(totals["removed"].items(), key=lambda kv: _reason_order(kv[0])))
    totals["candidate_pairs"] = count_pairs(work)
    k = cfg["samples_per_reason"]
    picked = [rec for reason in sorted(samples, key=_reason_order) for rec in sorted(samples[reason], key=lambda x: x["key"])[:k]]
    (out_dir / SAMPLES).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    write_jsonl_zst(out_dir / DUPLICATES, (rec for r in range(n) for rec in read_jsonl_zst(work / "duplicates" / f"{r:05d}.jsonl.zst")))
    bands, rows, t = cfg["bands"], cfg["rows"], cfg["threshold"]
    manifest = {
        "format": DEDUP_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"clova-train {__version__}",
        "config": cfg,
        "recipe": fp["recipe"],
        "method": {
            "shingles": f"{cfg['ngram']}-grams of {cfg['shingle']}s after NFC, control characters out, lower case, "
            "punctuation out, digits as 0",
            "minhash": f"{bands * rows} hashes (datatrove MinhashDedupSignature), {bands} bands x {rows} rows",
            "p_candidate_at_threshold": round(1 - (1 - t**rows) ** bands, 4),
            "verification": f"a candidate pair is a duplicate when >= {t} of its {bands * rows} minhashes agree",
            "kept": "the earliest document of each cluster, by input order then position",
        },
        "inputs": inputs,
        "parts": parts,
        "totals": totals,
        "samples": SAMPLES,
        "duplicates": DUPLICATES,
        "fingerprint": fp,
    }
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    fsync_path(out_dir)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
        return manifest
    for p in work.iterdir():
        if p.name in keep:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return manifest


def _reason_order(reason: str) -> tuple[int, str]:
    return (REASONS.index(reason) if reason in REASONS else len(REASONS), reason)


def _report(manifest: dict, out_dir: Path, seconds: float, *, complete: bool) -> dict:
    size = sum(i["bytes"] for i in manifest["inputs"])
    return {
        "out": str(out_dir),
        "already_complete": complete,
        "totals": manifest["totals"],
        "inputs": len(manifest["inputs"]),
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds if seconds else 0.0,
    }
