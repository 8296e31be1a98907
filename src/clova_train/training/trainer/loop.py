"""The training loop of one rank (:func:`run_worker`): it calls :func:`train_step`, an :class:`Evaluator`, a :class:`Checkpointer` and a :class:`MetricsLogger`."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import asdict, replace

import torch

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json
from clova_train.core.progress import console
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import flops_per_token, num_params
from clova_train.training import launch
from clova_train.training.checkpoints.checkpoint import Checkpointer, Faults, seed_all, set_rng_state, tag_for
from clova_train.training.run.config import RunSpec, TrainConfig, lr_at, ramp_batches, rampup_batch
from clova_train.training.parallel.distributed import CollectiveError, Dist, init_distributed
from clova_train.training.parallel.ds_config import resolve_precision
from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config
from clova_train.training.parallel.dims import ParallelDims
from clova_train.training.parallel.engine import Engine
from clova_train.training.parallel.tensor import check_tensor_parallel
from clova_train.training.trainer.loggers import open_trackers
from clova_train.training.trainer.metrics import MetricsLogger, ProgressLine, _finite_or_none, device_memory, memory_in_use, peak_tflops
from clova_train.training.parallel.pipeline import PipelineEngine
from clova_train.training.trainer.prefetch import Prefetcher, optimizer_kernel
from clova_train.training.run.preflight import _rank0_check, memory_check
from clova_train.training.checkpoints.markers import newest_checkpoint
from clova_train.training.checkpoints.reshard import check_structure, describe_change, layout, load_resharded
from clova_train.training.rundir import CONFIG_FILE
from clova_train.shards.format import check_open_files
from clova_train.shards.index import ORDER_VERSION
from clova_train.training.data.sampler import TrainStream, check_order_version, eval_batches, no_validation_reason, prepare_indices
from clova_train.training.trainer.step import BadStepGuard, Evaluator, StopSignal, train_step
from clova_train.training.parallel.zero import ZeroEngine


def parallel_dims(parallel: ParallelConfig, world: int, ds_config: dict) -> ParallelDims:
    """The run's layout: what --parallel and --pipeline-stages ask for, at the ZeRO stage the DeepSpeed config resolved."""
    return ParallelDims.from_config(parallel, world, zero_stage=ds_config["zero_optimization"]["stage"])


def build_engine(model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist, init=None) -> Engine:
    """The engine of the run's mode; its weights drawn from ``seed``, or read from ``init`` (an InitFrom: --init-from)."""
    dims = parallel_dims(parallel, dist.world, ds_config)
    engine = PipelineEngine if dims.pipelined else ZeroEngine
    return engine(model_cfg, ds_config, parallel, dims, seed=seed, dist=dist, init=init)


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
        **({"init_from": spec.init_from} if spec.init_from else {}),
        "run": {
            "world_size": spec.world_size,
            "layout": parallel_dims(spec.parallel, spec.world_size, ds_config).as_dict(),
            "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
            "steps": train.steps,
            "tokens_per_step": train.tokens_per_step,
            "tokens": train.tokens_through(train.steps),
            "parameters": num_params(spec.model),
            "flops_per_token": flops_per_token(spec.model, train.seq_len),
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
    stages, replicas, tp = spec.parallel.stages(spec.world_size), spec.parallel.replicas(spec.world_size), spec.parallel.tensor_parallel
    layout = f"{stages} stages x {replicas} replicas, partition {spec.parallel.partition}, " if spec.parallel.mode == "pipeline" else ""
    layout += f"tensor parallel {tp} (each block split over {tp} ranks), " if tp > 1 else ""
    mem = f"~{estimate['bytes']['total'] / 1024**3:.3g} GiB per rank (plan estimate)" if estimate else "memory not estimated (custom shape)"
    valid = f"validation on {eval_sequences} sequences every {train.eval_every} steps" if eval_sequences else f"no validation ({no_eval})"
    ramp = ramp_batches(train)
    if ramp:
        start, inc, tokens = train.batch_rampup
        valid += (f"; the batch ramps from {start} by {inc} sequences over {tokens:,} tokens, full ({train.global_batch}) "
                  f"from step {len(ramp) + 1}")
    return (
        f"{m.name}: {num_params(m):,} parameters, {spec.parallel.mode} on {spec.world_size} rank(s) ({layout}{device}, {train.precision}"
        f"{', offload ' + spec.parallel.offload if spec.parallel.offload != 'none' else ''}"
        f"{', activation checkpointing' if spec.parallel.activation_checkpointing else ''}); "
        f"{train.global_batch} x {train.seq_len} tokens per step = micro-batch {train.micro_batch} x {accum} accumulation x "
        f"{replicas} replicas; {train.steps:,} steps, {train.tokens_through(train.steps):,} tokens; {mem}; {valid}"
    )


def run_worker(spec: RunSpec) -> str:
    """Train on this rank until the last step or a stop signal; returns how it ended ("done" or "stopped")."""
    return Trainer(spec).run()


class Trainer:
    """One rank's run in four named pieces: :meth:`build` (engine, data, checkpointer, metrics), :meth:`resume`,
    :meth:`step` (one optimizer step and its record) and :meth:`save`; :meth:`run` calls them."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.dist = dist = init_distributed()
        if dist.world != spec.world_size:
            raise ClovaError(f"the run was prepared for {spec.world_size} ranks but {dist.world} joined")
        self.rank0 = dist.rank == 0
        self.run_dir = spec.run_dir
        try:  # every rank sees the same node size, so every rank refuses alike and rank 0 says it
            check_tensor_parallel(spec.model, ParallelDims.from_config(spec.parallel, dist.world), dist.local_world)
        except ClovaError as e:
            raise CollectiveError(str(e)) from None
        if not spec.checked:
            _rank0_check(spec, dist.rank)
        self.precision = resolve_precision(spec.train.precision, dist.is_cuda)
        self.train = replace(spec.train, precision=self.precision)
        self.device_name, device_gb = device_memory(dist)
        self.estimate = memory_check(spec, self.precision, self.device_name, device_gb, dist.local_world,
                                     show=console.print if self.rank0 else None)
        self.faults = Faults()
        self.step_no = self.tokens = 0
        self.last = {"loss": None, "valid_loss": None}
        self.launcher = os.environ.get("CLOVA_LAUNCHER", "external")
        self.build()

    def build(self) -> None:
        """The engine, the data streams, the checkpointer, the metrics and the evaluator of this rank."""
        spec, train, dist = self.spec, self.train, self.dist
        seed_all(train.seed)
        tb_dir = str(self.run_dir / "tensorboard") if train.tensorboard else None
        self.ds_config = deepspeed_config(spec.deepspeed_template, train, spec.parallel, world=dist.world, cuda=dist.is_cuda,
                                          tensorboard_dir=tb_dir, model=spec.model)
        self.kernel = optimizer_kernel(self.ds_config, dist.is_cuda)
        init = self._init_source()
        self.engine = engine = build_engine(spec.model, self.ds_config, spec.parallel, seed=train.seed, dist=dist, init=init)
        engine.loss_options = {"eod_id": spec.tokenizer["eod_id"] if train.doc_mask else None, "z_loss": train.z_loss}
        # Pipeline stages of one replica read the same samples (the first its inputs, the last its targets).
        share = dict(micro_batch=train.micro_batch, rank=engine.data_rank, world=engine.data_world)
        check_open_files()
        datasets, valid_data = prepare_indices(spec.data, train.seq_len, train.seed, train.samples_through(train.steps),
                                               build=self.rank0, note=console.print if dist.local_rank == 0 else None)
        ramp = None
        if train.batch_rampup:
            start, inc, tokens = train.batch_rampup
            ramp = functools.partial(rampup_batch, start=start, increment=inc, ramp_samples=tokens // train.seq_len, global_batch=train.global_batch)
        self.stream = Prefetcher(TrainStream(datasets, spec.data.weights, global_batch=train.global_batch, batch_at=ramp, **share), pin=dist.is_cuda)
        self.valid = eval_batches(valid_data, train.eval_samples if train.eval_every else 0, **share)
        self.no_eval = no_validation_reason(len(valid_data), train.eval_every, train.eval_samples, engine.data_world)
        self.ckpt = Checkpointer(self.run_dir, engine, rank=dist.rank, world=dist.world, keep_last=train.keep_last,
                                 keep_every=train.keep_every, faults=self.faults)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank0, monitor=engine.monitor if self.rank0 else None)
        self.guard = BadStepGuard(train.max_bad_steps)
        self.freeze = None
        if train.freeze_except_embeddings:
            from clova_train.training.trainer.freeze import freeze_stage

            self.freeze = freeze_stage(engine, spec.model, spec.init_from, train.freeze_except_embeddings, spec.tokenizer["path"], init=init)
        self.evaluator = Evaluator(engine, self.valid)
        self.fewshot = None
        if train.eval_tasks and train.eval_every:
            from clova_train.training.trainer.fewshot import FewShot

            self.fewshot = FewShot(train.eval_tasks, shots=train.eval_shots, limit=train.eval_limit, model_cfg=spec.model,
                                   tokenizer=spec.tokenizer["path"], engine=engine, rank0=self.rank0)
        self.flops = flops_per_token(spec.model, train.seq_len)
        self.peak = peak_tflops(self.device_name, train.peak_tflops)
        self.here = layout(engine.dims, spec.parallel.partition)

    def _init_source(self):
        """--init-from's reader, unless a checkpoint of this run will replace the weights anyway (a resume reads no source)."""
        spec = self.spec
        if not spec.init_from or newest_checkpoint(self.run_dir) is not None:
            return None
        from clova_train.training.initfrom.loader import InitFrom

        return InitFrom(spec.init_from, spec.model, spec.tokenizer["path"])

    def resume(self) -> tuple[str | None, str | None]:
        """Continue from the newest complete checkpoint, if any; (its tag, the line saying what changed in the layout)."""
        train, changed = self.train, None
        tag = self.ckpt.latest(self.spec.resume_step)
        if tag is not None:
            state, changed = resume_state(self.ckpt, tag, self.here, self.spec)
            self.step_no, self.tokens = state["step"], state["tokens"]
            check_order_version(state, self.ckpt.dir / tag)
            self.stream.load_state_dict(state["sampler"])
            self.guard = BadStepGuard(train.max_bad_steps, state["bad_steps"], state["consecutive_bad_steps"])
            if state.get("rng") is not None:
                set_rng_state(state["rng"])
            else:  # new ranks have no RNG of their own to continue; dropout masks differ from then on
                seed_all(hash((train.seed, self.step_no, self.dist.rank)) % 2**63)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = run_config(self.spec, train, self.ds_config, self.device_name)
            atomic_write_json(self.run_dir / CONFIG_FILE, config)
            # Trackers live on rank 0 beside metrics.jsonl: the loss reaches it all-reduced (from the last stage when pipelining).
            self.metrics.backends += open_trackers(self.run_dir, config, lambda line: console.print(line, highlight=False, soft_wrap=True),
                                                   wandb=train.wandb, wandb_entity=train.wandb_entity,
                                                   wandb_run_name=train.wandb_run_name, mlflow=train.mlflow)
        self.metrics.resume_at(self.step_no)
        return tag, changed

    def step(self, stop_requested: bool):
        """One optimizer step, evaluated when due, logged; (its result, its record)."""
        train, dist, step = self.train, self.dist, self.step_no + 1
        self.step_no = step
        at = self.stream.state_dict()  # the step's data position, described only if it goes bad
        lr = lr_at(step, train)
        batch_size = train.batch_at(step)
        if train.batch_rampup and batch_size != self.engine.ds.train_batch_size():
            self.engine.ds.set_train_batch_size(batch_size)  # more micro-batches per step, each the same size
        if self.freeze is not None:
            self.freeze.at(step)
        t0 = time.perf_counter()
        batch = self.stream.next_batch()
        self.engine.inject_nan = step in self.faults.nan_at_steps
        res = train_step(self.engine, batch, lr, stop_requested=stop_requested, loss_scaling=self.precision == "fp16")
        seconds = time.perf_counter() - t0
        step_tokens = batch_size * train.seq_len
        self.tokens += step_tokens
        tps = step_tokens / seconds
        tflops = self.flops * tps / dist.world / 1e12
        record = {
            "step": step,
            "loss": res.loss,
            "lr": lr,
            "grad_norm": res.grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": tps,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "memory_gb": memory_in_use(dist.is_cuda),
            "step_seconds": seconds,
            "skipped": res.skipped,
            "bad_steps": self.guard.total + res.skipped,
            "samples": self.stream.position,
        }
        if train.batch_rampup:
            record["batch"] = batch_size
        if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
            record.update(self.evaluator())
            if self.fewshot is not None:
                record.update(self.fewshot())
        self.last["loss"] = _finite_or_none(res.loss)
        self.last["valid_loss"] = record.get("valid_loss", self.last["valid_loss"])
        self.metrics.log(record)
        self.progress.update(record, seconds)
        self.guard.update(res.skipped, step, self.stream.describe(at) if res.skipped else "")
        if self.rank0 and self.faults.kill_at_step == step:
            self.faults.kill()
        return res, record

    def save(self) -> str:
        """A checkpoint of the current step; its tag."""
        at, guard, spec = self.step_no, self.guard, self.spec
        # Rank-independent state: in DeepSpeed's client state and, readable without unpickling, in the marker
        # (resuming on another layout reads it there); each rank's RNG goes to its own file (Checkpointer.save).
        resume = {"sampler": self.stream.state_dict(), "order_version": ORDER_VERSION, "bad_steps": guard.total,
                  "consecutive_bad_steps": guard.consecutive}
        client = {"clova": {"step": at, "tokens": self.tokens, "config_hash": spec.config_hash, "world_size": self.dist.world, **resume}}
        marker = {"step": at, "tokens": self.tokens, "loss": self.last["loss"], "valid_loss": self.last["valid_loss"],
                  "config_hash": spec.config_hash, "world_size": self.dist.world, "launcher": self.launcher,
                  "time": time.time(), "clova_train": __version__, "layout": self.here, "parallel_dims": self.engine.dims.as_dict(),
                  # The model this checkpoint holds: a later context-extension stage changes the run's config.json, not this.
                  "model": asdict(spec.model),
                  "gradient_accumulation_steps": self.ds_config["gradient_accumulation_steps"], **resume}
        saved = self.ckpt.save(at, client, marker)
        self.metrics.amend({"save_seconds": saved["seconds"], "save_bytes": saved["bytes"]})
        window = preempt_window(self.train)
        if window is not None and saved["seconds"] > window:
            self.progress.note(
                f"warning: saving {saved['tag']} took {saved['seconds']:.0f} s, longer than the {window:.0f} s preemption "
                f"window; a preempted job would be killed mid-save: ask for at least --signal=USR1@{math.ceil(2 * saved['seconds'])}"
                " in cli/train.sbatch (and CLOVA_PREEMPT_WINDOW, or --preempt-window, to match)"
            )
        self.metrics.plot()
        return saved["tag"]

    def run(self) -> str:
        spec, train, run_dir = self.spec, self.train, self.run_dir
        tag, changed = self.resume()
        self.progress = progress = ProgressLine(enabled=self.rank0, total_steps=train.steps, log_every=train.log_every)
        eval_sequences = sum(map(len, self.valid)) * self.engine.data_world  # eval micro-batches may be smaller
        progress.note(describe_run(spec, train, self.ds_config, self.device_name, self.estimate, eval_sequences=eval_sequences,
                                   no_eval=self.no_eval))
        progress.note(self.kernel)
        if spec.init_from and not self.step_no:
            progress.note(init_line(spec.init_from))
        if self.step_no >= train.steps:
            progress.note(f"{run_dir}: already trained to step {self.step_no} of {train.steps}; nothing to do")
            return "done"
        if self.step_no:
            progress.note(f"resuming from {tag} (step {self.step_no}, {self.tokens:,} tokens)")
        if changed:
            progress.note(changed)
        due = False  # a save that a skipped step put off
        with StopSignal() as stop_signal, progress, contextlib.closing(self.metrics), contextlib.closing(self.stream):
            while self.step_no < train.steps:
                res, _ = self.step(stop_requested=stop_signal.received is not None)
                step = self.step_no
                due = due or step % train.save_every == 0
                if res.skipped and (due or res.stop or step == train.steps):
                    # A skipped step's state is never a checkpoint, and pruning then would drop good ones.
                    progress.note(f"step {step} was skipped (non-finite loss or gradient norm): its checkpoint waits for the next good step")
                elif res.stop or due or step == train.steps:
                    saved = self.save()
                    due = False
                    progress.note(f"checkpoint {saved} saved")
                if res.stop:
                    progress.note(self._stopped_line(step, res.skipped, stop_signal))
                    return "stopped"
        progress.note(f"done: {self.step_no} steps, {self.tokens:,} tokens; checkpoints in {self.ckpt.dir}")
        return "done"

    def _stopped_line(self, step: int, skipped: bool, stop_signal: StopSignal) -> str:
        run_dir, launcher = self.run_dir, self.launcher
        how = "Resume with: " + {
            "local": f"clova train --out {run_dir} --resume",
            "slurm": f"resubmit the job (srun ... clova train --out {run_dir} --resume)",
        }.get(launcher, f"clova train --out {run_dir} --resume, started the same way on {self.dist.world} ranks")
        if launcher == "slurm" and stop_signal.received == signal.SIGUSR1 and requeue_wanted(self.train) and self.dist.rank == 0:
            # SIGUSR1 is the time-limit warning (--signal=USR1@120), SIGTERM a scancel: only the first comes back.
            how = launch.requeue_slurm_job()
        kept = f"checkpoint {tag_for(step)} is complete" if not skipped else (
            f"step {step} was skipped, so the newest checkpoint is {self.ckpt.latest() or 'none (the run restarts at step 1)'}")
        return f"stopped by {stop_signal.name} after step {step}; {kept}. {how}"


def init_line(init_from: dict) -> str:
    """What --init-from did to the weights, in one line."""
    from clova_train.training.initfrom.graft import describe_counts

    if init_from.get("graft"):
        return f"weights from {init_from['path']}; embeddings grafted onto this tokenizer: {describe_counts(init_from['graft'])}"
    return f"weights from {init_from['path']} (its own tokenizer: embedding rows copied as they are)"


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
    same_tp = old.get("tensor_parallel", 1) == here.get("tensor_parallel", 1)
    if same_tp and all(old.get(k) == v for k, v in here.items() if k in old):
        return ckpt.load(tag, structure=lambda: check_structure(ckpt.dir.parent, tag, marker, spec.model, spec.parallel.mode)), None
    if "sampler" not in marker:
        raise CollectiveError(f"{ckpt.dir / tag} was written on {old['world_size']} ranks by an older clova train; resume it on {old['world_size']} ranks")
    load_resharded(ckpt.engine, ckpt.dir.parent, tag, marker, spec.model, spec.parallel.mode)
    accum = spec.train.global_batch // (spec.train.micro_batch * here["replicas"])
    line = describe_change(old, here, marker.get("gradient_accumulation_steps"), accum, spec.train.micro_batch)
    return {**marker, "rng": None}, line
