"""`clova train`'s configs: the optimisation settings, the request as given, and the resolved run every rank receives."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.training.parallel.ds_config import PRECISIONS, ParallelConfig
from clova_train.training.data.sampler import DataConfig

# GPT-3 warmed up over its first 375M tokens.
GPT3_WARMUP_TOKENS = 375_000_000
SCHEDULES = ("cosine", "constant", "wsd")


@dataclass
class TrainConfig:
    """Optimisation, schedule, and the loop's cadence."""

    seq_len: int = 2048
    """Tokens per training sequence."""
    global_batch: int = 1024
    """Sequences per optimizer step over all ranks (GPT-3: 1024), reached by gradient accumulation."""
    micro_batch: int = 1
    """Sequences per rank per forward pass."""
    batch_rampup: list[int] | None = None
    """[START, INCREMENT, TOKENS], Megatron-LM's --rampup-batch-size: the global batch starts at START sequences and grows by INCREMENT, evenly spread over the first TOKENS tokens, up to global_batch (None: the full batch from step 1)."""
    lr: float | None = None
    """Peak learning rate (None: the model preset's GPT-3 value; 0 trains nothing, which checks a start)."""
    min_lr: float | None = None
    """Learning rate at the end of the decay (None: lr / 10)."""
    warmup: int | None = None
    """Linear warm-up steps (None: GPT-3's 375M tokens, at most a tenth of the run)."""
    schedule: str = "cosine"
    """After the warm-up: cosine (GPT-3's decay to min_lr), constant (lr to the end) or wsd (warm-up, stable at lr, then a linear decay to min_lr over the last decay_fraction of the run)."""
    decay_tokens: int | None = None
    """The cosine reaches min_lr once this many tokens are trained, and the rate stays there (GPT-3: 260e9); None: at the last step."""
    decay_fraction: float = 0.2
    """wsd: the share of the run's tokens spent decaying, at its end (Hägele et al. 2024: 20% matches a cosine); extending the run moves the decay with the end."""
    freeze_except_embeddings: int = 0
    """With --init-from onto another tokenizer: train only the embedding (and untied head) rows it rebuilt for the first N steps (EEVE's first stage); 0: off."""
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
    eval_tasks: list[str] = field(default_factory=list)
    """Few-shot tasks scored at each evaluation on the model in memory, as TASK=DATA[:TRAIN] (any task `clova eval` knows)."""
    eval_shots: int = 0
    """Demonstrations per prompt for eval_tasks (drawn from TRAIN with `clova eval`'s default seed)."""
    eval_limit: int = 0
    """Score only the first N examples of each eval task (0: all)."""
    keep_last: int = 3
    """Keep only the newest N complete checkpoints (0: keep all); an 82B checkpoint with its optimizer state is over 1 TB."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of N, beyond keep_last (0: no milestones)."""
    preempt_window: float | None = None
    """Seconds between the preemption signal and the kill (None: CLOVA_PREEMPT_WINDOW, as cli/train.sbatch sets it); a slower save is warned about."""
    requeue: bool | None = None
    """Under srun: after the checkpoint a SIGUSR1 (time limit near) triggers, requeue the job so it resumes by itself (None: CLOVA_REQUEUE=1, as cli/train.sbatch sets it)."""
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
    wandb: str | None = None
    """Weights & Biases project to log to (None: no W&B); WANDB_MODE=offline writes RUN_DIR/wandb for `wandb sync`."""
    wandb_entity: str | None = None
    """W&B entity (team or user) of the project (None: the account's default)."""
    wandb_run_name: str | None = None
    """W&B run name (None: the run dir's name)."""
    mlflow: str | None = None
    """MLflow tracking URI to log to, e.g. file:/path/mlruns (no server) or http://host:5000 (None: no MLflow)."""
    doc_mask: bool = False
    """Attention stops at end-of-document tokens inside a packed sequence, and positions restart per document."""
    z_loss: float = 0.0
    """Weight of PaLM's z-loss, mean (log Z)^2 of the output softmax (PaLM: 1e-4; 0: off); the logged training loss includes it."""

    def __post_init__(self) -> None:
        positive = ("seq_len", "global_batch", "micro_batch", "save_every", "max_bad_steps", "log_every")
        for f in positive:
            if getattr(self, f) < 1:
                raise ClovaError(f"train {f} must be >= 1, not {getattr(self, f)}")
        for f in ("eval_every", "eval_samples", "eval_shots", "eval_limit", "keep_last", "keep_every", "weight_decay", "grad_clip", "z_loss"):
            if getattr(self, f) < 0:
                raise ClovaError(f"train {f} must be >= 0, not {getattr(self, f)}")
        for f in ("steps", "train_tokens", "peak_tflops", "preempt_window"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ClovaError(f"train {f} must be > 0, not {v}")
        for f in ("lr", "min_lr", "freeze_except_embeddings"):
            v = getattr(self, f)
            if v is not None and not v >= 0:
                raise ClovaError(f"train {f} must be >= 0, not {v}")
        if self.schedule not in SCHEDULES:
            raise ClovaError(f"train schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ClovaError(f"train decay_fraction must be in (0, 1], not {self.decay_fraction}")
        if self.decay_tokens is not None and self.schedule != "cosine":
            raise ClovaError(f"decay_tokens ends the cosine; the {self.schedule} schedule does not use it"
                             + (" (wsd decays over the last decay_fraction of the run)" if self.schedule == "wsd" else ""))
        if self.decay_tokens is not None and self.decay_tokens < 1:
            raise ClovaError(f"train decay_tokens must be >= 1, not {self.decay_tokens}")
        if self.batch_rampup is not None:
            check_rampup(self.batch_rampup, self.global_batch, self.micro_batch)
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
        """Tokens of a full-batch step (under --batch-rampup, of the steps after the ramp)."""
        return self.global_batch * self.seq_len

    def batch_at(self, step: int) -> int:
        """Global batch of optimizer step ``step`` (1-based)."""
        ramp = ramp_batches(self)
        return ramp[step - 1] if step <= len(ramp) else self.global_batch

    def samples_through(self, step: int) -> int:
        """Sequences trained on by the end of step ``step`` (0: none)."""
        ramp = ramp_batches(self)
        done = min(step, len(ramp))
        return sum(ramp[:done]) + (step - done) * self.global_batch

    def tokens_through(self, step: int) -> int:
        return self.samples_through(step) * self.seq_len

    def steps_for_tokens(self, tokens: int) -> int:
        """The first step by whose end ``tokens`` tokens are trained."""
        ramp = ramp_batches(self)
        done = 0
        for step, batch in enumerate(ramp, 1):
            done += batch * self.seq_len
            if done >= tokens:
                return step
        return len(ramp) + max(0, math.ceil((tokens - done) / self.tokens_per_step))

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """Every None replaced by its value: lr from the preset, steps from tokens, the warm-up."""
        if self.steps is None and self.train_tokens is None:
            raise ClovaError("say how long to train: --steps N or --train-tokens N")
        lr = self.lr if self.lr is not None else model.lr
        steps = self.steps if self.steps is not None else self.steps_for_tokens(self.train_tokens)
        warmup = self.warmup
        if warmup is None:
            warmup = min(self.steps_for_tokens(GPT3_WARMUP_TOKENS), steps // 10)
        return replace(self, lr=lr, min_lr=self.min_lr if self.min_lr is not None else lr / 10, steps=steps, train_tokens=None, warmup=warmup)


def check_rampup(rampup: list[int], global_batch: int, micro_batch: int) -> None:
    """Megatron-LM's rule: START below the global batch, which START plus whole INCREMENTs reach exactly."""
    if len(rampup) != 3 or any(v < 1 for v in rampup):
        raise ClovaError(f"batch_rampup is START,INCREMENT,TOKENS, three numbers >= 1, not {rampup}")
    start, inc, _ = rampup
    if start >= global_batch or (global_batch - start) % inc:
        raise ClovaError(f"batch_rampup {start},{inc},...: the global batch {global_batch} must be START plus a whole number of INCREMENTs, above START")
    if start % micro_batch or inc % micro_batch:
        raise ClovaError(f"batch_rampup {start},{inc},...: START and INCREMENT must be multiples of the micro-batch {micro_batch}")


def rampup_batch(consumed: int, start: int, increment: int, ramp_samples: int, global_batch: int) -> int:
    """Megatron-LM's ramp: the batch after ``consumed`` sequences, START + INCREMENT per ramp_samples / increments."""
    per_increment = ramp_samples / ((global_batch - start) // increment)
    return min(global_batch, start + int(consumed / per_increment) * increment)


@functools.lru_cache(maxsize=8)
def _ramp(start: int, increment: int, ramp_samples: int, global_batch: int) -> tuple[int, ...]:
    batches, consumed = [], 0
    while (batch := rampup_batch(consumed, start, increment, ramp_samples, global_batch)) < global_batch:
        batches.append(batch)
        consumed += batch
    return tuple(batches)


def ramp_batches(cfg: TrainConfig) -> tuple[int, ...]:
    """The global batch of each step before the batch is full (empty without --batch-rampup)."""
    if not cfg.batch_rampup:
        return ()
    start, increment, tokens = cfg.batch_rampup
    return _ramp(start, increment, tokens // cfg.seq_len, cfg.global_batch)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up over cfg.warmup steps, then by cfg.schedule:

    - cosine: a cosine to min_lr by the token count cfg.decay_tokens (default: the run's last step), then min_lr;
    - constant: lr to the end;
    - wsd (warm-up, stable, decay; MiniCPM, Hägele et al. 2024): lr until the last decay_fraction of the run's
      tokens, then linear to min_lr at the last step. A continued run extended with a larger --steps keeps
      training at lr and decays at its new end.

    Progress is counted in tokens trained by the end of the step, as Megatron-LM counts samples, so a batch
    ramp decays as GPT-3 did; with a fixed batch it is (step - warmup) / (steps - warmup) exactly (integer
    ratios, one rounding).
    """
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        total = cfg.tokens_through(cfg.steps)
        start = max(cfg.tokens_through(cfg.warmup), total - round(cfg.decay_fraction * total))
        progress = min(1.0, max(0.0, (cfg.tokens_through(step) - start) / max(1, total - start)))
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    end = cfg.decay_tokens if cfg.decay_tokens is not None else cfg.tokens_through(cfg.steps)
    start = cfg.tokens_through(cfg.warmup)
    progress = min(1.0, (cfg.tokens_through(step) - start) / max(1, end - start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * max(0.0, progress)))


# ------------------------------------------------------------------ the resolved run


@dataclass
class TrainRequest:
    """What `clova train` was asked, before resolution (flags left None were not given)."""

    out: str
    model: str | None = None
    model_fields: dict[str, Any] = field(default_factory=dict)
    """Model config fields given as flags (arch, n_kv_head, rope_theta, qk_norm), over the preset or the file's model section."""
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    config: str | None = None
    deepspeed: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)
    data_cache: str | None = None
    """Directory of the memory-mapped sample indices (None: the config file's, else RUN_DIR/data_cache)."""
    init_from: str | None = None
    """A Hugging Face model directory (config.json + safetensors) whose weights the run starts from."""
    resume: bool = False
    force: bool = False
    """Start even when the memory plan says the run cannot fit."""
    resume_step: int | None = None
    """Resume from this step's checkpoint (discarding newer ones), e.g. when the newest is damaged."""
    reverify: bool = False
    """Re-hash every shard file before step 1, trusting no stamp of an earlier check."""


# A llama run may continue with a longer context (and another RoPE base): a context-extension stage of the same run.
# gpt3's learned positions stop at block_size, so there they stay part of the run's identity.
STAGE_MODEL_FIELDS = ("block_size", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


def stage_free(identity: dict) -> dict:
    """The identity without what a context-extension stage changes (seq_len and STAGE_MODEL_FIELDS; llama runs only)."""
    if identity.get("model", {}).get("arch") != "llama":
        return identity
    model = {k: v for k, v in identity["model"].items() if k not in STAGE_MODEL_FIELDS}
    return {**{k: v for k, v in identity.items() if k != "seq_len"}, "model": model}


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
    init_from: dict | None = None
    """The source of --init-from as initfrom.source.SourceInfo records it, with "graft" (row counts) when grafted; None: seeded weights."""
    force: bool = False
    resume_step: int | None = None
    reverify: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def config_hash(self) -> str:
        """What checkpoints carry to say which run wrote them: the identity, less what a later stage may change."""
        return hashlib.sha256(json.dumps(stage_free(self.identity), sort_keys=True).encode()).hexdigest()

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
            "resume_step": self.resume_step,
            "reverify": self.reverify,
            "init_from": self.init_from,
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
            resume_step=d.get("resume_step"),
            reverify=d.get("reverify", False),
            init_from=d.get("init_from"),
        )
