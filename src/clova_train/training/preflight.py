"""Checks before step 1: the run dir holds this run, the shards are intact, and the model fits in memory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json
from clova_train.training.config import RunSpec
from clova_train.training.distributed import CollectiveError
from clova_train.training.metrics import peak_tflops
from clova_train.training.rundir import CONFIG_FILE, VERIFIED_FILE


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def check_run_dir(spec: RunSpec) -> None:
    """Rerunning into a run dir continues it, so it must be the same run (on any number of ranks: see reshard.py)."""
    path = spec.run_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["run"]["identity"]
    except (KeyError, json.JSONDecodeError):
        raise ClovaError(f"{path}: not a clova run config; choose another --out") from None
    changed = _diff(old, spec.identity)
    if changed:
        shown = "; ".join(c[:120] for c in changed[:4])
        raise ClovaError(
            f"{spec.run_dir} holds a different run ({shown}); use a new --out, or `--resume` with the same model, "
            "data, seq-len, global batch and seed to continue it"
        )


def _shard_stamp(path: str) -> list:
    """Name, size and mtime of every file in a shard dir: what a rerun compares before re-hashing."""
    return [[f.name, st.st_size, st.st_mtime_ns] for f in sorted(Path(path).iterdir()) if f.is_file() for st in [f.stat()]]


def check_inputs(spec: RunSpec) -> None:
    """Verify every shard against its manifest (sizes, hashes, token range) before step 1.

    Re-hashing a 1 TB corpus takes tens of minutes, and a preempted run
    restarts often: a shard dir whose files still have the sizes and mtimes
    recorded after the last full check (RUN_DIR/verified_shards.json) is not
    re-hashed.
    """
    from clova_train.shards.format import verify_shard_dir

    record = spec.run_dir / VERIFIED_FILE
    try:
        verified = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except json.JSONDecodeError:
        verified = {}
    stamps = {path: _shard_stamp(path) for path in spec.data.paths}
    for path in spec.data.paths:
        if verified.get(path) != stamps[path]:
            verify_shard_dir(path)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, stamps)


def memory_check(spec: RunSpec, precision: str, device_name: str, device_gb: float, local_world: int, *, show=None) -> dict | None:
    """Estimate memory per rank with plan.py's model, hand ``show`` the plan table, and refuse what cannot fit.

    The refusal (a one-line error with the cheapest fix) is skipped with
    ``spec.force``: the estimate is conservative, and a user who knows better may try.
    Returns the estimate, or None for shapes plan.py does not cover (non-preset models).
    """
    from clova_train.training.plan import GB, PlanConfig, estimate, plan_table, suggest
    from clova_train.model.config import PRESETS

    m = spec.model
    preset = PRESETS.get(m.name)
    if preset is None or replace(preset, vocab_size=m.vocab_size, block_size=m.block_size) != m:
        return None  # plan.py estimates preset shapes only
    world = spec.world_size
    gpus, nodes = (local_world, world // local_world) if world % local_world == 0 else (world, 1)
    peak = peak_tflops(device_name, spec.train.peak_tflops)
    pc = PlanConfig(
        model=m.name, gpus=gpus, gpu_mem=device_gb, nodes=nodes, parallel=spec.parallel.mode,
        pipeline_stages=spec.parallel.stages(world), offload=spec.parallel.offload, seq_len=spec.train.seq_len, micro_batch=spec.train.micro_batch,
        vocab_size=m.vocab_size, precision=precision, activation_checkpointing=spec.parallel.activation_checkpointing,
        tokens=spec.train.steps * spec.train.tokens_per_step, peak_tflops=peak or PlanConfig.peak_tflops,
    )
    est = estimate(pc)
    fixes = [] if est["fits"] else suggest(pc)
    if show is not None:
        show(plan_table(est, fixes, devices=f"{device_name} ranks", time=peak is not None))
    if not est["fits"] and not spec.force:
        hint = f"try {fixes[0]}" if fixes else "use more devices or a smaller --micro-batch"
        raise CollectiveError(
            f"{m.name} needs about {est['bytes']['total'] / GB:.1f} GiB per rank "
            f"(of {est['bytes']['usable'] / GB:.1f} usable on {device_name}) at micro-batch {spec.train.micro_batch} "
            f"x {spec.train.seq_len} tokens on {world} ranks; {hint}, or pass --force to start anyway"
        )
    return est


def _rank0_check(spec: RunSpec, rank: int) -> None:
    """Under an external launcher, rank 0 checks the inputs once and every rank learns the verdict."""
    import torch.distributed as td

    verdict = [None]
    if rank == 0:
        try:
            check_inputs(spec)
        except ClovaError as e:
            verdict[0] = str(e)
    td.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise CollectiveError(verdict[0])
