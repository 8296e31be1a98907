"""The training loop of one rank (:func:`run_worker`) and `clova train`'s entry point (:func:`train`).

:func:`~clova_train.training.resolve.prepare` resolves the request, :mod:`launch` starts the ranks, and each
rank's loop calls :func:`train_step`, an :class:`Evaluator`, a :class:`Checkpointer` and a :class:`MetricsLogger`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json
from clova_train.core.lock import dir_lock
from clova_train.core.progress import console
from clova_train.model.config import ModelConfig
from clova_train.training import launch
from clova_train.training.checkpoint import Checkpointer, Faults, newest_checkpoint, seed_all, set_rng_state, tag_for
from clova_train.training.config import RunSpec, TrainConfig, TrainRequest, lr_at
from clova_train.training.distributed import CollectiveError, Dist, init_distributed
from clova_train.training.ds_config import resolve_precision
from clova_train.training.ds_config import ParallelConfig, deepspeed_config
from clova_train.training.engine import Engine
from clova_train.training.metrics import MetricsLogger, ProgressLine, _finite_or_none, device_memory, memory_in_use, peak_tflops
from clova_train.training.pipeline import PipelineEngine
from clova_train.training.prefetch import Prefetcher, optimizer_kernel
from clova_train.training.preflight import _rank0_check, memory_check
from clova_train.training.reshard import describe_change, layout, load_resharded
from clova_train.training.resolve import prepare
from clova_train.training.rundir import CONFIG_FILE
from clova_train.shards.format import check_open_files
from clova_train.shards.index import ORDER_VERSION
from clova_train.training.sampler import TrainStream, check_order_version, eval_batches, no_validation_reason, prepare_indices
from clova_train.training.step import BadStepGuard, Evaluator, StopSignal, train_step
from clova_train.training.zero import ZeroEngine


# The process entry point of a rank (it imports this module; naming it keeps launch free of the loop).
WORKER_MODULE = "clova_train.training.worker"


def build_engine(model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist) -> Engine:
    engine = PipelineEngine if parallel.mode == "pipeline" else ZeroEngine
    return engine(model_cfg, ds_config, parallel, seed=seed, dist=dist)


def run_config(spec: RunSpec, train: TrainConfig, ds_config: dict, device: str) -> dict:
    """RUN_DIR/config.json: everything that decides the run, resolved."""
    import deepspeed

    return {
        "model": asdict(spec.model),
        "train": asdict(train),
        "data": asdict(spec.data),
        "parallel": asdict(spec.parallel),
        "deepspeed": ds_config,
        "tokenizer": spec.tokenizer,
        "run": {
            "world_size": spec.world_size,
            "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
            "steps": train.steps,
            "tokens_per_step": train.tokens_per_step,
            "tokens": train.steps * train.tokens_per_step,
            "parameters": spec.model.num_params(),
            "flops_per_token": spec.model.flops_per_token(train.seq_len),
            "device": device,
            "config_hash": spec.config_hash,
            "identity": spec.identity,
            "versions": {"clova_train": __version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__},
        },
    }


def describe_run(spec: RunSpec, train: TrainConfig, ds_config: dict, device: str, estimate: dict | None, eval_sequences: int,
                 no_eval: str = "") -> str:
    """The opening line: what is trained, where, and how the global batch is made."""
    m = spec.model
    accum = ds_config["gradient_accumulation_steps"]
    stages = spec.parallel.stages(spec.world_size)
    layout = f"{stages} stages x {spec.world_size // stages} replicas, partition {spec.parallel.partition}, " if spec.parallel.mode == "pipeline" else ""
    mem = f"~{estimate['bytes']['total'] / 1024**3:.3g} GiB per rank (plan estimate)" if estimate else "memory not estimated (custom shape)"
    valid = f"validation on {eval_sequences} sequences every {train.eval_every} steps" if eval_sequences else f"no validation ({no_eval})"
    return (
        f"{m.name}: {m.num_params():,} parameters, {spec.parallel.mode} on {spec.world_size} rank(s) ({layout}{device}, {train.precision}"
        f"{', offload ' + spec.parallel.offload if spec.parallel.offload != 'none' else ''}"
        f"{', activation checkpointing' if spec.parallel.activation_checkpointing else ''}); "
        f"{train.global_batch} x {train.seq_len} tokens per step = micro-batch {train.micro_batch} x {accum} accumulation x "
        f"{spec.world_size // stages} replicas; {train.steps:,} steps, {train.steps * train.tokens_per_step:,} tokens; {mem}; {valid}"
    )


def run_worker(spec: RunSpec) -> str:
    """Train on this rank until the last step or a stop signal; returns how it ended ("done" or "stopped")."""
    dist = init_distributed()
    if dist.world != spec.world_size:
        raise ClovaError(f"the run was prepared for {spec.world_size} ranks but {dist.world} joined")
    rank0 = dist.rank == 0
    run_dir = spec.run_dir
    if not spec.checked:
        _rank0_check(spec, dist.rank)
    precision = resolve_precision(spec.train.precision, dist.is_cuda)
    train = replace(spec.train, precision=precision)
    device_name, device_gb = device_memory(dist)
    estimate = memory_check(spec, precision, device_name, device_gb, dist.local_world, show=console.print if rank0 else None)
    faults = Faults()

    seed_all(train.seed)
    tb_dir = str(run_dir / "tensorboard") if train.tensorboard else None
    ds_config = deepspeed_config(spec.deepspeed_template, train, spec.parallel, world=dist.world, cuda=dist.is_cuda, tensorboard_dir=tb_dir,
                                 d_model=spec.model.n_embd)
    kernel = optimizer_kernel(ds_config, dist.is_cuda)
    engine = build_engine(spec.model, ds_config, spec.parallel, seed=train.seed, dist=dist)
    # Pipeline stages of one replica read the same samples (the first its inputs, the last its targets).
    share = dict(micro_batch=train.micro_batch, rank=engine.data_rank, world=engine.data_world)
    check_open_files()
    datasets, valid_data = prepare_indices(spec.data, train.seq_len, train.seed, train.steps * train.global_batch,
                                           build=rank0, note=console.print if dist.local_rank == 0 else None)
    stream = Prefetcher(TrainStream(datasets, spec.data.weights, global_batch=train.global_batch, **share), pin=dist.is_cuda)
    valid = eval_batches(valid_data, train.eval_samples if train.eval_every else 0, **share)
    ckpt = Checkpointer(run_dir, engine, rank=dist.rank, world=dist.world, keep_last=train.keep_last, keep_every=train.keep_every, faults=faults)
    metrics = MetricsLogger(run_dir, enabled=rank0, monitor=engine.monitor if rank0 else None)
    guard = BadStepGuard(train.max_bad_steps)

    step = tokens = 0
    stages = spec.parallel.stages(dist.world)
    here = layout(spec.parallel.mode, dist.world, stages, spec.parallel.partition)
    changed = None
    tag = ckpt.latest(spec.resume_step)
    if tag is not None:
        state, changed = resume_state(ckpt, tag, here, spec)
        step, tokens = state["step"], state["tokens"]
        check_order_version(state, ckpt.dir / tag)
        stream.load_state_dict(state["sampler"])
        guard = BadStepGuard(train.max_bad_steps, state["bad_steps"], state["consecutive_bad_steps"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        else:  # new ranks have no RNG of their own to continue; dropout masks differ from then on
            seed_all(hash((train.seed, step, dist.rank)) % 2**63)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / CONFIG_FILE, run_config(spec, train, ds_config, device_name))
    metrics.resume_at(step)

    evaluator = Evaluator(engine, valid)
    flops = spec.model.flops_per_token(train.seq_len)
    peak = peak_tflops(device_name, train.peak_tflops)
    last = {"loss": None, "valid_loss": None}
    launcher = os.environ.get("CLOVA_LAUNCHER", "external")

    def save(at: int) -> str:
        # Rank-independent state: in DeepSpeed's client state and, readable without unpickling, in the marker
        # (resuming on another layout reads it there); each rank's RNG goes to its own file (Checkpointer.save).
        resume = {"sampler": stream.state_dict(), "order_version": ORDER_VERSION, "bad_steps": guard.total,
                  "consecutive_bad_steps": guard.consecutive}
        client = {"clova": {"step": at, "tokens": tokens, "config_hash": spec.config_hash, "world_size": dist.world, **resume}}
        marker = {"step": at, "tokens": tokens, "loss": last["loss"], "valid_loss": last["valid_loss"],
                  "config_hash": spec.config_hash, "world_size": dist.world, "launcher": launcher,
                  "time": time.time(), "clova_train": __version__, "layout": here,
                  "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"], **resume}
        saved = ckpt.save(at, client, marker)
        metrics.amend({"save_seconds": saved["seconds"], "save_bytes": saved["bytes"]})
        window = preempt_window(train)
        if window is not None and saved["seconds"] > window:
            progress.note(
                f"warning: saving {saved['tag']} took {saved['seconds']:.0f} s, longer than the {window:.0f} s preemption "
                f"window; a preempted job would be killed mid-save: ask for at least --signal=USR1@{math.ceil(2 * saved['seconds'])}"
                " in cli/train.sbatch (and CLOVA_PREEMPT_WINDOW, or --preempt-window, to match)"
            )
        metrics.plot()
        return saved["tag"]

    progress = ProgressLine(enabled=rank0, total_steps=train.steps, log_every=train.log_every)
    no_eval = no_validation_reason(len(valid_data), train.eval_every, train.eval_samples, engine.data_world)
    progress.note(describe_run(spec, train, ds_config, device_name, estimate, eval_sequences=sum(map(len, valid)) * engine.data_world, no_eval=no_eval))
    progress.note(kernel)
    if step >= train.steps:
        progress.note(f"{run_dir}: already trained to step {step} of {train.steps}; nothing to do")
        return "done"
    if step:
        progress.note(f"resuming from {tag} (step {step}, {tokens:,} tokens)")
    if changed:
        progress.note(changed)
    due = False  # a save that a skipped step put off
    with StopSignal() as stop_signal, progress, contextlib.closing(metrics), contextlib.closing(stream):
        while step < train.steps:
            step += 1
            at = stream.state_dict()  # the step's data position, described only if it goes bad
            lr = lr_at(step, train)
            t0 = time.perf_counter()
            batch = stream.next_batch()
            engine.inject_nan = step in faults.nan_at_steps
            res = train_step(engine, batch, lr, stop_requested=stop_signal.received is not None, loss_scaling=precision == "fp16")
            seconds = time.perf_counter() - t0
            tokens += train.tokens_per_step
            tps = train.tokens_per_step / seconds
            tflops = flops * tps / dist.world / 1e12
            record = {
                "step": step,
                "loss": res.loss,
                "lr": lr,
                "grad_norm": res.grad_norm,
                "tokens": tokens,
                "tokens_per_s": tps,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
                "memory_gb": memory_in_use(dist.is_cuda),
                "step_seconds": seconds,
                "skipped": res.skipped,
                "bad_steps": guard.total + res.skipped,
                "samples": stream.position,
            }
            if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
                record.update(evaluator())
            last["loss"] = _finite_or_none(res.loss)
            last["valid_loss"] = record.get("valid_loss", last["valid_loss"])
            metrics.log(record)
            progress.update(record, seconds)
            guard.update(res.skipped, step, stream.describe(at) if res.skipped else "")
            if rank0 and faults.kill_at_step == step:
                faults.kill()
            due = due or step % train.save_every == 0
            if res.skipped and (due or res.stop or step == train.steps):
                # A skipped step's state is never a checkpoint, and pruning then would drop good ones.
                progress.note(f"step {step} was skipped (non-finite loss or gradient norm): its checkpoint waits for the next good step")
            elif res.stop or due or step == train.steps:
                saved = save(step)
                due = False
                progress.note(f"checkpoint {saved} saved")
            if res.stop:
                how = "Resume with: " + {
                    "local": f"clova train --out {run_dir} --resume",
                    "slurm": f"resubmit the job (srun ... clova train --out {run_dir} --resume)",
                }.get(launcher, f"clova train --out {run_dir} --resume, started the same way on {dist.world} ranks")
                if launcher == "slurm" and stop_signal.received == signal.SIGUSR1 and requeue_wanted(train) and dist.rank == 0:
                    # SIGUSR1 is the time-limit warning (--signal=USR1@120), SIGTERM a scancel: only the first comes back.
                    how = launch.requeue_slurm_job()
                kept = f"checkpoint {tag_for(step)} is complete" if not res.skipped else (
                    f"step {step} was skipped, so the newest checkpoint is {ckpt.latest() or 'none (the run restarts at step 1)'}")
                progress.note(f"stopped by {stop_signal.name} after step {step}; {kept}. {how}")
                return "stopped"
    progress.note(f"done: {step} steps, {tokens:,} tokens; checkpoints in {ckpt.dir}")
    return "done"


def preempt_window(train: TrainConfig) -> float | None:
    """Seconds a preempted job has to save: --preempt-window, else CLOVA_PREEMPT_WINDOW (cli/train.sbatch), else unknown."""
    if train.preempt_window is not None:
        return train.preempt_window
    try:
        return float(os.environ["CLOVA_PREEMPT_WINDOW"])
    except (KeyError, ValueError):
        return None


def requeue_wanted(train: TrainConfig) -> bool:
    """--requeue/--no-requeue, else CLOVA_REQUEUE (cli/train.sbatch sets it to 1)."""
    if train.requeue is not None:
        return train.requeue
    return os.environ.get("CLOVA_REQUEUE", "").strip().lower() in ("1", "true", "yes")


def resume_state(ckpt: Checkpointer, tag: str, here: dict, spec: RunSpec) -> tuple[dict, str | None]:
    """The run's state from checkpoint ``tag``; and, when it was written on another layout, the line that says what changed.

    The same layout loads through DeepSpeed (and each rank's own RNG); another
    one is re-sharded from the layout-free reading of the files (reshard.py),
    with the rank-independent state from the completion marker.
    """
    marker = ckpt.marker(tag)
    if marker.get("config_hash") != spec.config_hash:
        raise CollectiveError(f"{ckpt.dir / tag} belongs to a different configuration; use a new --out")
    old = marker.get("layout") or {"world_size": marker["world_size"]}
    if all(old.get(k) == v for k, v in here.items() if k in old):
        return ckpt.load(tag), None
    if "sampler" not in marker:
        raise CollectiveError(f"{ckpt.dir / tag} was written on {old['world_size']} ranks by an older clova train; resume it on {old['world_size']} ranks")
    load_resharded(ckpt.engine, ckpt.dir.parent, tag, marker, spec.model, spec.parallel.mode)
    accum = spec.train.global_batch // (spec.train.micro_batch * here["replicas"])
    line = describe_change(old, here, marker.get("gradient_accumulation_steps"), accum, spec.train.micro_batch)
    return {**marker, "rng": None}, line


# ------------------------------------------------------------------ entry point


def train(req: TrainRequest, launch_cfg) -> int:
    """`clova train`: resolve, check, and start the ranks; the exit code."""
    if launch_cfg.nproc_per_node is None and not launch_cfg.hostfile:
        # A rerun continues on as many local workers as wrote the newest checkpoint.
        marker = newest_checkpoint(Path(req.out).resolve())
        if marker and marker.get("launcher") == "local":
            launch_cfg = replace(launch_cfg, nproc_per_node=marker["world_size"])
    world, external = launch.world_size(launch_cfg)
    spec = prepare(req, world, check=not external)
    spec.checked = not external
    marker = newest_checkpoint(spec.run_dir)
    if req.resume and marker is None:
        console.print(f"{spec.run_dir}: no complete checkpoint yet; --resume starts the run from step 0")
    if marker and marker["step"] >= spec.train.steps:
        console.print(f"{spec.run_dir}: already trained to step {marker['step']} of {spec.train.steps}; nothing to do")
        return 0
    # One writer per run dir: the launching process holds the lock; where every process already is a rank
    # (srun, torchrun), rank 0 does.
    rank0 = not external or (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"
    with dir_lock(spec.run_dir, "clova train", note=console.print) if rank0 else contextlib.nullcontext():
        return launch.launch(spec, launch_cfg, worker=run_worker, module=WORKER_MODULE)
