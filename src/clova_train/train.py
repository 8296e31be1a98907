"""`clova train`: configs, the checks before step 1, and the training loop as named pieces.

:func:`prepare` resolves what the user asked for (flags over a ``--config``
file over a ``--deepspeed`` template over defaults) into a :class:`RunSpec`
and checks the inputs; :mod:`launch` starts the ranks; each rank runs
:func:`run_worker`: the loop calls :func:`train_step`, an :class:`Evaluator`,
a :class:`Checkpointer` and a :class:`MetricsLogger`.

Run dir layout (``clova export`` relies on it):

``config.json``
    The resolved configuration: "model" (ModelConfig fields), "train", "data",
    "parallel", "deepspeed" (the exact DeepSpeed config), "tokenizer" {path,
    hash, vocab_size, eod_id} and "run" (world size, steps, config hash...).
``checkpoints/<tag>/``
    ``engine.save_checkpoint(RUN_DIR/checkpoints, tag=...)`` with tags
    ``step_00000100``; ``clova_checkpoint.json`` inside is written last and
    marks the checkpoint complete; ``checkpoints/latest`` names the newest
    complete tag and is updated only after the marker.
``metrics.jsonl``, ``loss.png``, ``tensorboard/``
    One JSON object per optimizer step; the loss plot (at each checkpoint);
    TensorBoard events through DeepSpeed's monitor.
``launch.json``, ``verified_shards.json``
    The resolved run handed to the workers; the shard files last verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import from_dict, read_json_object
from .data import DataConfig, data_config_from_specs
from .errors import ClovaError
from .model import ModelConfig, pad_vocab
from .parallel import PRECISIONS, ParallelConfig, check_partition, template_defaults, zero_stage
from .util import atomic_write_json, atomic_write_text, fsync_path

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_DIR = "checkpoints"
MARKER_FILE = "clova_checkpoint.json"
LATEST_FILE = "latest"
LAUNCH_FILE = "launch.json"
VERIFIED_FILE = "verified_shards.json"
# GPT-3 warmed up over its first 375M tokens.
GPT3_WARMUP_TOKENS = 375_000_000


@dataclass
class TrainConfig:
    """Optimisation, schedule, and the loop's cadence."""

    seq_len: int = 2048
    """Tokens per training sequence."""
    global_batch: int = 1024
    """Sequences per optimizer step over all ranks (GPT-3: 1024), reached by gradient accumulation."""
    micro_batch: int = 1
    """Sequences per rank per forward pass."""
    lr: float | None = None
    """Peak learning rate (None: the model preset's GPT-3 value)."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (None: lr / 10)."""
    warmup: int | None = None
    """Linear warm-up steps (None: GPT-3's 375M tokens, at most a tenth of the run)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (biases and LayerNorms: 0)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2 (GPT-3: 0.95)."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    steps: int | None = None
    """Optimizer steps to train for (give this or train_tokens)."""
    train_tokens: int | None = None
    """Tokens to train on, rounded up to whole steps (give this or steps)."""
    precision: str = "auto"
    """bf16, fp16 or fp32; auto: bf16 on CUDA, fp32 on CPU."""
    save_every: int = 1000
    """Checkpoint every this many steps (and at the end, and on SIGTERM/SIGUSR1)."""
    eval_every: int = 1000
    """Evaluate on the valid split every this many steps (0: never)."""
    eval_samples: int = 256
    """Validation sequences per evaluation (the first ones of the valid split)."""
    keep_last: int = 0
    """Keep only the newest N complete checkpoints (0: keep all)."""
    seed: int = 1234
    """Seed of the initialisation and of the global sample order."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU (None: from the table of known accelerators)."""
    log_every: int = 10
    """Print a progress line every this many steps when stderr is not a terminal."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tensorboard through DeepSpeed's monitor."""

    def __post_init__(self) -> None:
        positive = ("seq_len", "global_batch", "micro_batch", "save_every", "max_bad_steps", "log_every")
        for f in positive:
            if getattr(self, f) < 1:
                raise ClovaError(f"train {f} must be >= 1, not {getattr(self, f)}")
        for f in ("eval_every", "eval_samples", "keep_last", "weight_decay", "grad_clip"):
            if getattr(self, f) < 0:
                raise ClovaError(f"train {f} must be >= 0, not {getattr(self, f)}")
        for f in ("steps", "train_tokens", "lr", "min_lr", "peak_tflops"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ClovaError(f"train {f} must be > 0, not {v}")
        if self.warmup is not None and self.warmup < 0:
            raise ClovaError(f"train warmup must be >= 0, not {self.warmup}")
        if self.steps is not None and self.train_tokens is not None:
            raise ClovaError("give --steps or --train-tokens, not both")
        if self.precision not in PRECISIONS:
            raise ClovaError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.global_batch % self.micro_batch:
            raise ClovaError(f"global batch {self.global_batch} is not a multiple of micro-batch {self.micro_batch}")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ClovaError(f"min_lr {self.min_lr} is above lr {self.lr}")
        for f in ("beta1", "beta2"):
            if not 0 <= getattr(self, f) < 1:
                raise ClovaError(f"train {f} must be in [0, 1), not {getattr(self, f)}")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """Every None replaced by its value: lr from the preset, steps from tokens, the warm-up."""
        if self.steps is None and self.train_tokens is None:
            raise ClovaError("say how long to train: --steps N or --train-tokens N")
        lr = self.lr if self.lr is not None else model.lr
        steps = self.steps if self.steps is not None else math.ceil(self.train_tokens / self.tokens_per_step)
        warmup = self.warmup
        if warmup is None:
            warmup = min(math.ceil(GPT3_WARMUP_TOKENS / self.tokens_per_step), steps // 10)
        return replace(self, lr=lr, min_lr=self.min_lr if self.min_lr is not None else lr / 10, steps=steps, train_tokens=None, warmup=warmup)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine to min_lr."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ the resolved run


@dataclass
class TrainRequest:
    """What `clova train` was asked, before resolution (flags left None were not given)."""

    out: str
    model: str | None = None
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    config: str | None = None
    deepspeed: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    force: bool = False
    """Start even when the memory plan says the run cannot fit."""


@dataclass
class RunSpec:
    """A fully resolved run, as handed to every rank (RUN_DIR/launch.json)."""

    out: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    parallel: ParallelConfig
    deepspeed_template: dict
    tokenizer: dict
    world_size: int
    identity: dict
    resume: bool = False
    checked: bool = False
    force: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {
            "out": self.out,
            "model": asdict(self.model),
            "train": asdict(self.train),
            "data": asdict(self.data),
            "parallel": asdict(self.parallel),
            "deepspeed_template": self.deepspeed_template,
            "tokenizer": self.tokenizer,
            "world_size": self.world_size,
            "identity": self.identity,
            "resume": self.resume,
            "checked": self.checked,
            "force": self.force,
        }

    @classmethod
    def from_json(cls, d: dict) -> "RunSpec":
        return cls(
            out=d["out"],
            model=ModelConfig(**d["model"]),
            train=TrainConfig(**d["train"]),
            data=DataConfig(**d["data"]),
            parallel=ParallelConfig(**d["parallel"]),
            deepspeed_template=d["deepspeed_template"],
            tokenizer=d["tokenizer"],
            world_size=d["world_size"],
            identity=d["identity"],
            resume=d["resume"],
            checked=d["checked"],
            force=d.get("force", False),
        )


CONFIG_SECTIONS = ("model", "train", "data", "parallel", "deepspeed", "tokenizer", "run")


def _read_config_file(path: Path) -> dict:
    cfg = read_json_object(path)
    unknown = sorted(set(cfg) - set(CONFIG_SECTIONS))
    if unknown:
        raise ClovaError(f"{path}: unknown section(s) {', '.join(unknown)}; accepted: {', '.join(CONFIG_SECTIONS)}")
    return cfg


def _layer(cls, where: str, *layers: dict, flags: dict):
    """Build ``cls`` from dict layers (later wins), strictly, then the flags that were given."""
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(cls, merged, where=where)


def _shard_fingerprint(manifest: dict) -> str:
    """Identifies a shard dir's training data by content, wherever it is mounted."""
    train = sorted((s["prefix"], s.get("bin_sha256", "")) for s in manifest["shards"] if s["split"] == "train")
    return hashlib.sha256(json.dumps(train).encode()).hexdigest()


def prepare(req: TrainRequest, world_size: int, *, check: bool = True) -> RunSpec:
    """Resolve a request into a RunSpec; with ``check``, also verify shards and vocabulary (before step 1)."""
    from .shards import read_manifest
    from .tokenizer import ClovaTokenizer

    run_dir = Path(req.out).resolve()
    config_path = Path(req.config) if req.config else None
    if req.resume and config_path is None and (run_dir / CONFIG_FILE).is_file():
        config_path = run_dir / CONFIG_FILE
    file_cfg = _read_config_file(config_path) if config_path else {}
    where = str(config_path) if config_path else "flags"

    # Data: flags replace the file's list; paths become absolute so the run dir is self-describing.
    data = data_config_from_specs(req.data) if req.data else from_dict(DataConfig, file_cfg.get("data", {}), where=f"{where}: data")
    if not data.paths:
        raise ClovaError("no training data: give --data SHARD_DIR[:WEIGHT]...")
    manifests = [read_manifest(p) for p in data.paths]
    data = DataConfig(
        paths=[str(Path(p).resolve()) for p in data.paths],
        weights=data.weights or [float(sum(s["tokens"] for s in m["shards"] if s["split"] == "train")) for m in manifests],
    )

    # Tokenizer: the flag, else the file's, else the one the shards were made with.
    tok_path = req.tokenizer or (file_cfg.get("tokenizer") or {}).get("path") or manifests[0]["tokenizer"]["path"]
    tok = ClovaTokenizer.load(tok_path)
    for path, man in zip(data.paths, manifests):
        if man["tokenizer"]["hash"] != tok.hash:
            raise ClovaError(
                f"{path} was tokenized with tokenizer {man['tokenizer']['hash'][:12]} ({man['tokenizer'].get('path')}) "
                f"but training would use {tok.hash[:12]} ({tok_path}); retokenize it with this tokenizer "
                "or pass --tokenizer with the one recorded in its manifest.json"
            )

    # DeepSpeed template: its settings sit between our defaults and the file/flags.
    from .parallel import load_template

    template = load_template(req.deepspeed) if req.deepspeed else dict(file_cfg.get("deepspeed") or {})
    tmpl_train, tmpl_par = template_defaults(template)
    file_train = dict(file_cfg.get("train", {}))
    if req.train.get("steps") is not None or req.train.get("train_tokens") is not None:
        # A length flag replaces the file's length, whichever way the file put it.
        file_train.pop("steps", None), file_train.pop("train_tokens", None)
    train = _layer(TrainConfig, f"{where}: train", tmpl_train, file_train, flags=req.train)
    parallel = _layer(ParallelConfig, f"{where}: parallel", tmpl_par, file_cfg.get("parallel", {}), flags=req.parallel)

    # Model: the preset flag, else the file's model section; the vocabulary comes from the tokenizer.
    if req.model:
        model = ModelConfig.from_name(req.model, vocab_size=pad_vocab(tok.vocab_size))
    elif "model" in file_cfg:
        fields = dict(file_cfg["model"])
        fields.setdefault("vocab_size", pad_vocab(tok.vocab_size))
        model = from_dict(ModelConfig, fields, where=f"{where}: model")
    else:
        raise ClovaError("which model? give --model PRESET (e.g. tiny, 137m, 1.3b) or a --config with a model section")
    if tok.vocab_size > model.vocab_size:
        raise ClovaError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.vocab_size} embeddings; "
            f"set model.vocab_size to at least {pad_vocab(tok.vocab_size)} or drop it to take the tokenizer's"
        )
    if train.seq_len > model.block_size:
        raise ClovaError(
            f"--seq-len {train.seq_len} exceeds the model's {model.block_size} positions; "
            "use a shorter --seq-len or a --config whose model section sets block_size"
        )
    train = train.resolved(model)
    stages = parallel.stages(world_size)
    zero_stage(template, parallel)  # ZeRO-2/3 with pipeline stages: refused here, before any rank starts
    if parallel.mode == "pipeline":
        parallel = replace(parallel, pipeline_stages=stages)
        check_partition(model, parallel, stages)
    replicas = world_size // stages
    micro_world = train.micro_batch * replicas
    if train.global_batch % micro_world:
        raise ClovaError(
            f"global batch {train.global_batch} is not a multiple of micro-batch {train.micro_batch} x {replicas} "
            f"data-parallel replicas; use a --global-batch that is a multiple of {micro_world}"
        )

    identity = {
        "model": asdict(model),
        "seq_len": train.seq_len,
        "global_batch": train.global_batch,
        "seed": train.seed,
        "tokenizer": tok.hash,
        "data": [{"shards": _shard_fingerprint(m), "weight": w / sum(data.weights)} for m, w in zip(manifests, data.weights)],
        # The checkpoint layout: ZeRO-3 shards and pipeline layer files do not load into each other,
        # nor do optimizer partitions of stages cut differently.
        "parallel": {"mode": parallel.mode, "stages": stages, **({"partition": parallel.partition} if parallel.mode == "pipeline" else {})},
    }
    spec = RunSpec(
        out=str(run_dir),
        model=model,
        train=train,
        data=data,
        parallel=parallel,
        deepspeed_template=template,
        tokenizer={"path": str(Path(tok_path).resolve()), "hash": tok.hash, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id},
        world_size=world_size,
        identity=identity,
        resume=req.resume,
        force=req.force,
    )
    check_run_dir(spec)
    if check:
        check_inputs(spec)
    return spec


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def newest_checkpoint(run_dir: Path) -> dict | None:
    """The completion marker of the newest complete checkpoint, or None."""
    complete = Checkpointer.complete(run_dir / CHECKPOINT_DIR)
    if not complete:
        return None
    return json.loads((run_dir / CHECKPOINT_DIR / complete[-1][1] / MARKER_FILE).read_text(encoding="utf-8"))


def check_run_dir(spec: RunSpec) -> None:
    """Rerunning into a run dir continues it, so it must be the same run, on as many ranks."""
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
    marker = newest_checkpoint(spec.run_dir)
    if marker and marker["world_size"] != spec.world_size and marker["step"] < spec.train.steps:
        raise ClovaError(
            f"{spec.run_dir / CHECKPOINT_DIR / marker['tag']} was written by {marker['world_size']} ranks and this run "
            f"has {spec.world_size}; ZeRO-3 keeps one shard per rank: resume on {marker['world_size']} ranks"
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
    from .shards import verify_shard_dir

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
    from .plan import GB, PlanConfig, estimate, plan_table, suggest
    from .presets import PRESETS

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


class CollectiveError(ClovaError):
    """Raised identically on every rank (after a collective); only rank 0 prints it."""


# ------------------------------------------------------------------ loop pieces


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    stop: bool
    seconds: float


def train_step(engine, micro_batches: list[torch.Tensor], lr: float, *, stop_requested: bool, loss_scaling: bool = False) -> StepResult:
    """One optimizer step over a global batch; the loss averaged over all ranks, and whether any rank must stop.

    The stop flag rides on the loss all-reduce, so every rank agrees at no extra cost.
    ``skipped`` means a non-finite loss or gradient norm; under fp16 loss
    scaling an overflow step that DeepSpeed skips to lower the scale is routine
    and does not count.
    """
    import torch.distributed as td

    t0 = time.perf_counter()
    skipped_before = engine.skipped_steps
    engine.set_lr(lr)
    local = engine.train_batch(micro_batches)
    both = torch.stack([local.float(), torch.tensor(float(stop_requested), device=local.device)])
    td.all_reduce(both)
    loss, stop = (both[0] / td.get_world_size()).item(), both[1].item() > 0
    grad_norm = engine.grad_norm
    overflow = engine.skipped_steps > skipped_before
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or (loss_scaling and overflow))
    skipped = not finite or (overflow and not loss_scaling)
    return StepResult(loss, grad_norm, skipped, stop, time.perf_counter() - t0)


class BadStepGuard:
    """Counts steps skipped for a non-finite loss or gradient norm; stops after too many in a row."""

    def __init__(self, limit: int, total: int = 0, consecutive: int = 0):
        self.limit = limit
        self.total = total
        self.consecutive = consecutive

    def update(self, bad: bool, step: int, where: str) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise CollectiveError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
                f"(data: {where}); stopped. Resume from the last checkpoint with a lower --lr, or raise --max-bad-steps"
            )


class StopSignal:
    """SIGTERM or SIGUSR1 (cluster preemption), or a first Ctrl-C: finish the step, save, exit 0.

    A second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a peer rank's signal"


class Faults:
    """Fault injection for the fault-tolerance tests, from CLOVA_FAULT (e.g. "kill_at_step=6;nan_at_steps=3,4").

    kill_at_step=N: rank 0 kills itself (SIGKILL) after step N is logged.
    kill_in_save=N: rank 0 kills itself after DeepSpeed wrote step N's files, before the completion marker.
    nan_at_steps=A,B: every rank's loss becomes NaN at those steps.
    """

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("CLOVA_FAULT", "") if spec is None else spec
        self.kill_at_step = self.kill_in_save = None
        self.nan_at_steps: set[int] = set()
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            key, _, value = item.partition("=")
            if key == "kill_at_step":
                self.kill_at_step = int(value)
            elif key == "kill_in_save":
                self.kill_in_save = int(value)
            elif key == "nan_at_steps":
                self.nan_at_steps = {int(v) for v in value.split(",") if v}
            else:
                raise ClovaError(f"CLOVA_FAULT: unknown fault {key!r}")

    @staticmethod
    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fsync_tree(directory: Path, rank: int, world: int) -> None:
    """Make a checkpoint durable before it is marked complete; the ranks share the files."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for p in files[rank::world]:
        fsync_path(p)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """DeepSpeed checkpoints that become visible only when complete.

    Save: DeepSpeed writes RUN_DIR/checkpoints/<tag>/ (every rank its shards),
    all ranks fsync and meet, then rank 0 writes the completion marker and
    only then points ``latest`` at the tag (both atomically). A kill at any
    moment leaves ``latest`` on a complete checkpoint. Load takes the newest
    tag that has the marker, whatever ``latest`` says.
    """

    def __init__(self, run_dir: Path, engine, *, rank: int, world: int, keep_last: int, faults: Faults | None = None):
        self.dir = run_dir / CHECKPOINT_DIR
        self.engine = engine
        self.rank = rank
        self.world = world
        self.keep_last = keep_last
        self.faults = faults or Faults("")

    @staticmethod
    def complete(directory: Path) -> list[tuple[int, str]]:
        """(step, tag) of every complete checkpoint, oldest first."""
        out = []
        if directory.is_dir():
            for marker in directory.glob(f"step_*/{MARKER_FILE}"):
                try:
                    info = json.loads(marker.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue  # a marker is written atomically; an unreadable one is not ours
                out.append((int(info["step"]), marker.parent.name))
        return sorted(out)

    def latest(self) -> str | None:
        """The newest complete tag, as rank 0 sees it (every rank gets the same answer)."""
        import torch.distributed as td

        done = self.complete(self.dir) if self.rank == 0 else []
        found = [done[-1][1] if done else None]
        td.broadcast_object_list(found, src=0)
        return found[0]

    def save(self, step: int, client_state: dict, marker: dict) -> str:
        import torch.distributed as td

        tag = tag_for(step)
        target = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a save that was killed; never marked, never loaded
                shutil.rmtree(target)
        td.barrier()
        self.engine.save(self.dir, tag, client_state)
        _fsync_tree(target, self.rank, self.world)
        td.barrier()
        if self.rank == 0:
            if self.faults.kill_in_save == step:
                self.faults.kill()
            atomic_write_json(target / MARKER_FILE, {"tag": tag, **marker})
            fsync_path(target)
            atomic_write_text(self.dir / LATEST_FILE, tag)
            fsync_path(self.dir)
            self.prune()
        td.barrier()
        return tag

    def prune(self) -> None:
        """Drop unmarked leftovers, and complete checkpoints beyond --keep-last (oldest first)."""
        complete = self.complete(self.dir)
        marked = {tag for _, tag in complete}
        for d in self.dir.glob("step_*"):
            if d.is_dir() and d.name not in marked:
                shutil.rmtree(d, ignore_errors=True)
        if self.keep_last:
            for _, tag in complete[: -self.keep_last]:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def load(self, tag: str) -> dict:
        client = self.engine.load(self.dir, tag)
        if "clova" not in client:
            raise CollectiveError(f"{self.dir / tag}: not written by clova train (no client state)")
        return client["clova"]


class Evaluator:
    """Loss and perplexity on the same validation windows every time."""

    def __init__(self, engine, batches: list[torch.Tensor]):
        self.engine = engine
        self.batches = batches

    def __call__(self) -> dict:
        import torch.distributed as td

        if not self.batches:
            return {}
        total = self.engine.eval_loss(self.batches)
        both = torch.stack([total.float(), torch.tensor(float(len(self.batches)), device=total.device)])
        td.all_reduce(both)
        loss = (both[0] / both[1]).item()
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 700.0))}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class MetricsLogger:
    """RUN_DIR/metrics.jsonl (one object per optimizer step), TensorBoard events and loss.png; rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, monitor=None):
        self.path = run_dir / METRICS_FILE
        self.plot_path = run_dir / PLOT_FILE
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.records: list[dict] = []

    def resume_at(self, step: int) -> None:
        """Keep what steps 1..step logged; later lines belong to the interrupted attempt."""
        if not self.enabled:
            return
        self.records = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= step:
                    self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(clean)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.monitor is not None:
            step = record["step"]
            events = [(f"Train/{k}", record[k], step) for k in ("loss", "lr", "grad_norm", "tokens_per_s") if clean.get(k) is not None]
            events += [(f"Valid/{k[6:]}", record[k], step) for k in ("valid_loss", "valid_ppl") if clean.get(k) is not None]
            self.monitor.write_events(events)

    def plot(self) -> None:
        """Redraw loss.png in the background: the other ranks would otherwise wait for matplotlib."""
        if self.enabled and self.records:
            self.close()
            self._plotter = threading.Thread(target=plot_losses, args=(list(self.records), self.plot_path), daemon=True)
            self._plotter.start()

    def close(self) -> None:
        if getattr(self, "_plotter", None) is not None:
            self._plotter.join()
            self._plotter = None


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and valid loss against tokens seen (matplotlib's Agg canvas, no pyplot state), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    valid = [(r["tokens"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Dense bf16 peak of one device, from plan.py's table of known accelerators, or the override."""
    if override:
        return override
    from .plan import ACCELERATOR_PEAK_TFLOPS

    name = device_name.lower()
    for key, value in ACCELERATOR_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def device_memory(dist) -> tuple[str, float]:
    """(device name, GiB a rank may use): the GPU's memory, or this node's RAM shared by its ranks."""
    if dist.is_cuda:
        props = torch.cuda.get_device_properties(dist.local_rank)
        return props.name, props.total_memory / 1024**3
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return "cpu", ram / max(1, dist.local_world)


def memory_in_use(cuda: bool) -> float:
    """GiB: peak allocated on the GPU, or this process's peak RSS."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class ProgressLine:
    """Rank 0's live line: step, loss, lr, grad norm, tokens/s, TFLOP/s and MFU per device, memory, ETA."""

    def __init__(self, *, enabled: bool, total_steps: int, log_every: int):
        from .progress import console

        self.console = console
        self.enabled = enabled
        self.total = total_steps
        self.log_every = log_every
        self.live = None
        self.times: deque[float] = deque(maxlen=20)

    def __enter__(self) -> "ProgressLine":
        if self.enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def format(self, r: dict) -> str:
        eta = self.eta(r["step"])
        parts = [
            f"step {r['step']}/{self.total}",
            f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss nan (skipped)",
            f"lr {r['lr']:.2e}",
            f"grad {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad nan",
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"{r['tflops_per_device']:.3g} TFLOP/s/dev",
        ]
        if r.get("mfu") is not None:
            parts.append(f"MFU {r['mfu']:.1%}")
        parts.append(f"mem {r['memory_gb']:.1f} GiB")
        if r.get("valid_loss") is not None:
            parts.append(f"valid {r['valid_loss']:.4f} (ppl {r['valid_ppl']:.1f})")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def eta(self, step: int) -> str:
        recent = self.times
        if not recent:
            return "?"
        s = int(sum(recent) / len(recent) * (self.total - step))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def update(self, record: dict, step_seconds: float) -> None:
        self.times.append(step_seconds)
        if not self.enabled:
            return
        line = self.format(record)
        if self.live is not None:
            self.live.update(line)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total or "valid_loss" in record:
            self.console.print(line, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ one rank


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


def describe_run(spec: RunSpec, train: TrainConfig, ds_config: dict, device: str, estimate: dict | None, eval_sequences: int) -> str:
    """The opening line: what is trained, where, and how the global batch is made."""
    m = spec.model
    accum = ds_config["gradient_accumulation_steps"]
    stages = spec.parallel.stages(spec.world_size)
    layout = f"{stages} stages x {spec.world_size // stages} replicas, partition {spec.parallel.partition}, " if spec.parallel.mode == "pipeline" else ""
    mem = f"~{estimate['bytes']['total'] / 1024**3:.3g} GiB per rank (plan estimate)" if estimate else "memory not estimated (custom shape)"
    valid = f"validation on {eval_sequences} sequences every {train.eval_every} steps" if eval_sequences else "no validation (empty valid split or --eval-every 0)"
    return (
        f"{m.name}: {m.num_params():,} parameters, {spec.parallel.mode} on {spec.world_size} rank(s) ({layout}{device}, {train.precision}"
        f"{', offload ' + spec.parallel.offload if spec.parallel.offload != 'none' else ''}"
        f"{', activation checkpointing' if spec.parallel.activation_checkpointing else ''}); "
        f"{train.global_batch} x {train.seq_len} tokens per step = micro-batch {train.micro_batch} x {accum} accumulation x "
        f"{spec.world_size // stages} replicas; {train.steps:,} steps, {train.steps * train.tokens_per_step:,} tokens; {mem}; {valid}"
    )


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


def run_worker(spec: RunSpec) -> str:
    """Train on this rank until the last step or a stop signal; returns how it ended ("done" or "stopped")."""
    from . import parallel
    from .data import TrainStream, eval_batches, open_train_data, open_valid_data

    dist = parallel.init_distributed()
    if dist.world != spec.world_size:
        raise ClovaError(f"the run was prepared for {spec.world_size} ranks but {dist.world} joined")
    rank0 = dist.rank == 0
    run_dir = spec.run_dir
    if not spec.checked:
        _rank0_check(spec, dist.rank)
    precision = parallel.resolve_precision(spec.train.precision, dist.is_cuda)
    train = replace(spec.train, precision=precision)
    device_name, device_gb = device_memory(dist)
    from .progress import console

    estimate = memory_check(spec, precision, device_name, device_gb, dist.local_world, show=console.print if rank0 else None)
    faults = Faults()

    seed_all(train.seed)
    tb_dir = str(run_dir / "tensorboard") if train.tensorboard else None
    ds_config = parallel.deepspeed_config(spec.deepspeed_template, train, spec.parallel, world=dist.world, cuda=dist.is_cuda, tensorboard_dir=tb_dir)
    engine = parallel.build_engine(spec.model, ds_config, spec.parallel, seed=train.seed, dist=dist)
    # Pipeline stages of one replica read the same samples (the first its inputs, the last its targets).
    share = dict(micro_batch=train.micro_batch, rank=engine.data_rank, world=engine.data_world)
    datasets = open_train_data(spec.data.paths, train.seq_len, train.seed)
    stream = TrainStream(datasets, spec.data.weights, global_batch=train.global_batch, **share)
    valid = eval_batches(open_valid_data(spec.data.paths, train.seq_len), train.eval_samples if train.eval_every else 0, **share)
    ckpt = Checkpointer(run_dir, engine, rank=dist.rank, world=dist.world, keep_last=train.keep_last, faults=faults)
    metrics = MetricsLogger(run_dir, enabled=rank0, monitor=engine.monitor if rank0 else None)
    guard = BadStepGuard(train.max_bad_steps)

    step = tokens = 0
    tag = ckpt.latest()
    if tag is not None:
        state = ckpt.load(tag)
        if state["config_hash"] != spec.config_hash:
            raise CollectiveError(f"{ckpt.dir / tag} belongs to a different configuration; use a new --out")
        if state["world_size"] != dist.world:
            raise CollectiveError(
                f"{ckpt.dir / tag} was written by {state['world_size']} ranks and this run has {dist.world}; "
                "ZeRO-3 shards are per rank: resume with the same number of ranks"
            )
        step, tokens = state["step"], state["tokens"]
        stream.load_state_dict(state["sampler"])
        guard = BadStepGuard(train.max_bad_steps, state["bad_steps"], state["consecutive_bad_steps"])
        set_rng_state(state["rng"][dist.rank])
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
        import torch.distributed as td

        rngs = [None] * dist.world
        td.all_gather_object(rngs, rng_state())
        client = {
            "clova": {
                "step": at,
                "tokens": tokens,
                "sampler": stream.state_dict(),
                "rng": rngs,
                "config_hash": spec.config_hash,
                "world_size": dist.world,
                "bad_steps": guard.total,
                "consecutive_bad_steps": guard.consecutive,
            }
        }
        marker = {"step": at, "tokens": tokens, "loss": last["loss"], "valid_loss": last["valid_loss"],
                  "config_hash": spec.config_hash, "world_size": dist.world, "launcher": launcher,
                  "time": time.time(), "clova_train": __version__}
        saved = ckpt.save(at, client, marker)
        metrics.plot()
        return saved

    progress = ProgressLine(enabled=rank0, total_steps=train.steps, log_every=train.log_every)
    progress.note(describe_run(spec, train, ds_config, device_name, estimate, eval_sequences=len(valid) * train.micro_batch * engine.data_world))
    if step >= train.steps:
        progress.note(f"{run_dir}: already trained to step {step} of {train.steps}; nothing to do")
        return "done"
    if step:
        progress.note(f"resuming from {tag} (step {step}, {tokens:,} tokens)")
    with StopSignal() as stop_signal, progress, contextlib.closing(metrics):
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
            if res.stop or step % train.save_every == 0 or step == train.steps:
                saved = save(step)
                progress.note(f"checkpoint {saved} saved")
            if res.stop:
                how = {
                    "local": f"clova train --out {run_dir} --resume",
                    "slurm": f"resubmit the job (srun ... clova train --out {run_dir} --resume)",
                }.get(launcher, f"clova train --out {run_dir} --resume, started the same way on {dist.world} ranks")
                progress.note(f"stopped by {stop_signal.name} after step {step}; checkpoint {tag_for(step)} is complete. Resume with: {how}")
                return "stopped"
    progress.note(f"done: {step} steps, {tokens:,} tokens; checkpoints in {ckpt.dir}")
    return "done"


# ------------------------------------------------------------------ entry point


def train(req: TrainRequest, launch_cfg) -> int:
    """`clova train`: resolve, check, and start the ranks; the exit code."""
    from . import launch

    if launch_cfg.nproc_per_node is None and not launch_cfg.hostfile:
        # A rerun continues on as many local workers as wrote the newest checkpoint.
        marker = newest_checkpoint(Path(req.out).resolve())
        if marker and marker.get("launcher") == "local":
            launch_cfg = replace(launch_cfg, nproc_per_node=marker["world_size"])
    world, external = launch.world_size(launch_cfg)
    spec = prepare(req, world, check=not external)
    spec.checked = not external
    marker = newest_checkpoint(spec.run_dir)
    from .progress import console

    if req.resume and marker is None:
        console.print(f"{spec.run_dir}: no complete checkpoint yet; --resume starts the run from step 0")
    if marker and marker["step"] >= spec.train.steps:
        console.print(f"{spec.run_dir}: already trained to step {marker['step']} of {spec.train.steps}; nothing to do")
        return 0
    return launch.launch(spec, launch_cfg)
