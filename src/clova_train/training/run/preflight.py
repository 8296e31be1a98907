"""Checks before step 1: the run dir holds this run, the shards are intact, and the model fits in memory."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json
from clova_train.training.run.config import RunSpec, stage_free
from clova_train.training.parallel.distributed import CollectiveError
from clova_train.training.trainer.metrics import peak_tflops
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
    # A context-extension stage is asked for with --resume; otherwise every field must be the run's.
    changed = _diff(stage_free(old), stage_free(spec.identity)) if spec.resume else _diff(old, spec.identity)
    if changed and all(c.startswith("seq_len ") for c in changed) and spec.model.arch == "gpt3":
        raise ClovaError(
            f"{spec.run_dir}: --seq-len {spec.identity['seq_len']} differs from the run's {old.get('seq_len')}; gpt3's positions are "
            "learned, so its context cannot be extended: keep the run's --seq-len (context extension is for --arch llama runs)"
        )
    if changed:
        shown = "; ".join(c[:120] for c in changed[:4])
        raise ClovaError(
            f"{spec.run_dir} holds a different run ({shown}); use a new --out, or `--resume` with the same model, "
            "data, seq-len, global batch and seed to continue it"
        )
    stage = _diff(old, spec.identity)
    if stage and (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
        from clova_train.core.progress import console

        console.print(f"context-extension stage of {spec.run_dir.name}: " + ", ".join(stage), highlight=False, soft_wrap=True)


STAMPS_VERSION = 2
# Below this many bytes to check, one process is quicker than starting a pool.
_POOL_BYTES = 1 << 28


def _read_stamps(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        rec = {}
    return rec.get("shards", {}) if isinstance(rec, dict) and rec.get("version") == STAMPS_VERSION else {}


def _check_merged_nodes(path: str, man: dict) -> None:
    """A merged dir's shards live in its node dirs: a node dir rebuilt after the merge is another dataset."""
    from clova_train.core.files import file_sha256
    from clova_train.shards.format import MANIFEST

    for node in man.get("node", {}).get("merged_from", []):
        node_man = Path(path) / node["dir"] / MANIFEST
        if not node_man.is_file() or file_sha256(node_man) != node["manifest_sha256"]:
            raise ClovaError(
                f"{path}: its node dir {node['dir']} changed since the merge (its {MANIFEST} differs); "
                f"rerun `clova tokenize merge` over the node dirs"
            )


def check_inputs(spec: RunSpec) -> None:
    """Verify every shard against its manifest (sizes, hashes, token range) before step 1.

    A full check reads every file once (hash and token checks in one pass,
    spread over processes when there is much to read) and stamps each file it
    read, by real path, in RUN_DIR/verified_shards.json: a merged dir's stamps
    cover the node dirs' files. A restart re-hashes every .idx and a seeded
    sample of .bin blocks against the stamps (cheap at any size) and fully
    checks only the shards that fail that; ``spec.reverify`` checks everything.
    """
    import os
    import time

    import numpy as np

    from clova_train.shards.format import prefix_files, read_manifest, verify_shard_dir
    from clova_train.shards.stamps import spot_check

    if getattr(spec, "init_from", None):
        from clova_train.training.checkpoints.markers import newest_checkpoint
        from clova_train.training.initfrom.prepare import hash_source

        hash_source(spec.init_from, resuming=newest_checkpoint(spec.run_dir) is not None)
    record = spec.run_dir / VERIFIED_FILE
    stamps = {} if getattr(spec, "reverify", False) else _read_stamps(record)
    rng = np.random.default_rng(time.time_ns())  # another sample of blocks at every start
    for path in spec.data.paths:
        man = read_manifest(path)
        _check_merged_nodes(path, man)
        keys, stale = {}, []
        for rec in man["shards"]:
            keys[rec["prefix"]] = key = os.path.realpath(prefix_files(Path(path) / rec["prefix"])[1])
            want = {k: rec[f"{k}_sha256"] for k in ("bin", "idx", "keys") if rec.get(f"{k}_sha256")}
            if key not in stamps or spot_check(stamps[key], want, rng) is not None:
                stale.append(rec)
        size = sum(r["bin_bytes"] for r in stale)
        workers = min(8, os.cpu_count() or 1) if size > _POOL_BYTES else 1
        checked = verify_shard_dir(path, workers=workers, only=[r["prefix"] for r in stale])
        for prefix, st in checked["stamps"].items():
            stamps[keys[prefix]] = st
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"version": STAMPS_VERSION, "shards": stamps})


def memory_check(spec: RunSpec, precision: str, device_name: str, device_gb: float, local_world: int, *, show=None) -> dict | None:
    """Estimate memory per rank with plan.py's model, hand ``show`` the plan table, and refuse what cannot fit.

    The refusal (a one-line error with the cheapest fix) is skipped with
    ``spec.force``: the estimate is conservative, and a user who knows better may try.
    Returns the estimate.
    """
    from dataclasses import asdict

    from clova_train.training.plan import GB, PlanConfig, estimate, plan_table, suggest
    from clova_train.training.planner.hardware import device_profile
    from clova_train.model.config import PRESETS

    m = spec.model
    preset = PRESETS.get(m.name)
    if preset is not None and replace(preset, vocab_size=m.vocab_size, block_size=m.block_size) == m:
        model = dict(model=m.name, vocab_size=m.vocab_size)
    else:
        model = dict(model="custom", shape=asdict(m))
    world = spec.world_size
    gpus, nodes = (local_world, world // local_world) if world % local_world == 0 else (world, 1)
    peak = peak_tflops(device_name, spec.train.peak_tflops)
    pc = PlanConfig(
        **model, gpus=gpus, gpu_mem=device_gb, nodes=nodes, parallel=spec.parallel.mode, gpu_type=device_profile(device_name),
        pipeline_stages=spec.parallel.stages(world), tensor_parallel=spec.parallel.tensor_parallel, offload=spec.parallel.offload,
        seq_len=spec.train.seq_len, micro_batch=spec.train.micro_batch, global_batch=spec.train.global_batch, precision=precision,
        reduce_dtype=spec.parallel.reduce_dtype if precision != "fp32" else "fp32", activation_checkpointing=spec.parallel.activation_checkpointing,
        tokens=spec.train.steps * spec.train.tokens_per_step, peak_tflops=peak,
    )
    est = estimate(pc)
    fixes = [] if est["fits"] else suggest(pc)
    if show is not None:
        per = "rank" if device_name == "cpu" else "GPU"  # device_memory names CPU ranks "cpu"
        show(plan_table(est, fixes, devices=f"{device_name} ranks", per=per, time=peak is not None))
    if not est["fits"] and not spec.force:
        hint = f"try {fixes[0]}" if fixes else "use more devices or a smaller --micro-batch"
        raise CollectiveError(
            f"{m.name} needs about {est['bytes']['total'] / GB:.1f} GiB per rank "
            f"(of {est['bytes']['usable'] / GB:.1f} usable on {device_name}) at micro-batch {spec.train.micro_batch} "
            f"x {spec.train.seq_len} tokens on {world} ranks; {hint}, or pass --force to start anyway"
        )
    return est


def _rank0_check(spec: RunSpec, rank: int) -> None:
    """Under an external launcher, rank 0 checks the inputs once and every rank reads the verdict from the run
    dir: a check of a large corpus outlasts a collective's timeout, so nobody waits inside one."""
    import secrets
    import time

    import torch.distributed as td

    token = [secrets.token_hex(8) if rank == 0 else None]
    td.broadcast_object_list(token, src=0)  # returns at once: every rank is here at start
    verdict = spec.run_dir / f".preflight-{token[0]}.json"
    if rank == 0:
        for old in spec.run_dir.glob(".preflight-*.json"):
            old.unlink(missing_ok=True)
        try:
            check_inputs(spec)
            result = {"error": None}
        except ClovaError as e:
            result = {"error": str(e)}
        atomic_write_json(verdict, result)
    else:
        t0 = time.monotonic()
        while not verdict.is_file():
            if time.monotonic() - t0 > spec.data.cache_timeout:
                raise CollectiveError(f"rank 0 did not finish checking the shards within {spec.data.cache_timeout:.0f} s; see its log")
            time.sleep(1.0)
        result = json.loads(verdict.read_text(encoding="utf-8"))
    if result["error"]:
        raise CollectiveError(result["error"])
