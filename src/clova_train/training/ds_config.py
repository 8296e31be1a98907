"""The DeepSpeed side of a run: parallel modes, precision, and the DeepSpeed config built from a template and our settings."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clova_train.core.config import read_json_object
from clova_train.core import dtypes
from clova_train.core.errors import ClovaError

MODES = ("zero3", "pipeline")
OFFLOADS = ("none", "cpu", "nvme")
PRECISIONS = ("auto", *dtypes.PRECISIONS)


@dataclass
class ParallelConfig:
    """How the model is spread over devices."""

    mode: str = "zero3"
    """zero3: everything sharded over all ranks; pipeline: layers split into stages, ZeRO-1 across replicas."""
    offload: str = "none"
    """ZeRO-3 offload of parameters and optimizer state: none, cpu or nvme."""
    nvme_path: str = "/local_nvme"
    """Directory on a local NVMe drive, for --offload nvme."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations."""
    pipeline_stages: int = 0
    """Pipeline stages in pipeline mode (0: one per rank); the ranks divide into stages x replicas."""
    partition: str = "parameters"
    """How pipeline mode cuts the layers into stages: parameters (equal parameter counts), uniform (equal layer counts) or type:REGEX (equal counts of the layers whose class matches, e.g. type:Block)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ClovaError(f"parallel mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.offload not in OFFLOADS:
            raise ClovaError(f"offload must be one of {', '.join(OFFLOADS)}, not {self.offload!r}")
        if self.mode == "pipeline" and self.offload != "none":
            raise ClovaError(
                f"--offload {self.offload} is a ZeRO-3 feature and DeepSpeed's pipeline engine runs ZeRO-1: "
                "drop --offload, or use --parallel zero3 --offload " + self.offload
            )
        if self.mode == "zero3" and self.pipeline_stages > 1:
            raise zero_with_pipeline(f"ZeRO-3 with {self.pipeline_stages} pipeline stages")
        if self.pipeline_stages < 0:
            raise ClovaError(f"pipeline_stages must be >= 0, not {self.pipeline_stages}")
        _check_partition_syntax(self.partition)
        if self.mode == "zero3" and self.partition != "parameters":
            raise ClovaError(f"--partition {self.partition} cuts pipeline stages and ZeRO-3 has none; add --parallel pipeline or drop --partition")

    def stages(self, world: int) -> int:
        """Pipeline stages on ``world`` ranks (1 in zero3 mode)."""
        if self.mode != "pipeline":
            return 1
        stages = self.pipeline_stages or world
        if world % stages:
            raise ClovaError(f"{world} ranks cannot form {stages} pipeline stages evenly; use a --pipeline-stages that divides {world}")
        return stages


def zero_with_pipeline(asked: str) -> ClovaError:
    """The one refusal of ZeRO-2/3 together with pipeline stages, whichever way they were asked for."""
    return ClovaError(
        f"{asked}: DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only (ZeRO-2/3 would shard the gradients and "
        "weights each stage must hold whole); choose --parallel zero3 (ZeRO-3 over all ranks, no stages) or "
        "--parallel pipeline --pipeline-stages N (stages, ZeRO-1 across replicas; DeepSpeed config with stage 0 or 1, "
        "e.g. deepspeed_configs/pipeline_zero1.json)"
    )


def _check_partition_syntax(method: str) -> None:
    kind, _, pattern = method.partition(":")
    if method in ("parameters", "uniform"):
        return
    if kind == "type" and pattern:
        # DeepSpeed keeps only the text between the first and the second colon: the rest would vanish silently.
        if ":" in pattern:
            raise ClovaError(f"--partition {method}: the class pattern cannot contain ':'")
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ClovaError(f"--partition {method}: {pattern!r} is not a regular expression ({e})") from None
        return
    raise ClovaError(f"--partition must be parameters, uniform or type:REGEX (e.g. type:Block), not {method!r}")


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def template_defaults(template: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings a DeepSpeed template gives our configs, as (train fields, parallel fields).

    They sit between our defaults and the user's flags, so ``--deepspeed
    zero3_offload.json`` means offload unless ``--offload none`` says otherwise.
    HF-style ``"auto"`` values are skipped.
    """
    train: dict[str, Any] = {}
    par: dict[str, Any] = {}
    given = lambda v: v is not None and v != "auto"  # noqa: E731
    for ours, theirs in (("global_batch", "train_batch_size"), ("micro_batch", "train_micro_batch_size_per_gpu"), ("grad_clip", "gradient_clipping")):
        if given(template.get(theirs)):
            train[ours] = template[theirs]
    for prec in ("bf16", "fp16"):
        if (template.get(prec) or {}).get("enabled") is True:
            train["precision"] = prec
    params = (template.get("optimizer") or {}).get("params") or {}
    for ours, theirs in (("lr", "lr"), ("weight_decay", "weight_decay"), ("eps", "eps")):
        if given(params.get(theirs)):
            train[ours] = params[theirs]
    if given(params.get("betas")):
        train["beta1"], train["beta2"] = params["betas"]
    zero = template.get("zero_optimization") or {}
    stage = zero.get("stage")
    stages = (template.get("pipeline") or {}).get("stages")
    if given(stage):
        if stage in (2, 3) and isinstance(stages, int) and stages > 1:
            raise zero_with_pipeline(f"the DeepSpeed config asks for ZeRO stage {stage} with {stages} pipeline stages")
        if stage not in (0, 1, 3):
            raise ClovaError(
                f"the DeepSpeed template sets ZeRO stage {stage}; use 3 (--parallel zero3) or 0/1 with the "
                "pipeline engine (--parallel pipeline), which refuses ZeRO-2/3"
            )
        par["mode"] = "zero3" if stage == 3 else "pipeline"
    if isinstance(stages, int):
        par["pipeline_stages"] = stages
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device")
        if given(dev) and dev != "none":
            par["offload"] = dev
            if dev == "nvme" and given(zero[key].get("nvme_path")):
                par["nvme_path"] = zero[key]["nvme_path"]
    return train, par


def deepspeed_config(template: dict, train, parallel: ParallelConfig, *, world: int, cuda: bool, tensorboard_dir: str | None) -> dict:
    """The DeepSpeed config of a run: the template, with every setting clova owns written from our configs."""
    ds = copy.deepcopy(template)
    replicas = world // parallel.stages(world)
    ds["train_batch_size"] = train.global_batch
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch
    ds["gradient_accumulation_steps"] = train.global_batch // (train.micro_batch * replicas)
    ds["gradient_clipping"] = train.grad_clip
    params = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": train.eps,
        "weight_decay": train.weight_decay,
    }
    if not cuda:
        params["torch_adam"] = True  # FusedAdam and DeepSpeedCPUAdam are JIT-compiled ops
    ds["optimizer"] = {"type": "AdamW", "params": params}
    # The loop sets the learning rate every step (resumable without scheduler state).
    ds.pop("scheduler", None)
    precision = resolve_precision(train.precision, cuda)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = zero_stage(template, parallel)
    for key in ("offload_optimizer", "offload_param"):
        if parallel.offload == "none":
            zero.pop(key, None)
        else:
            section = {**(zero.get(key) or {}), "device": parallel.offload}
            section.setdefault("pin_memory", cuda)
            if parallel.offload == "nvme":
                section["nvme_path"] = parallel.nvme_path
            zero[key] = section
    if not cuda and parallel.offload != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW with offload on the CPU accelerator
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    if tensorboard_dir:
        ds["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": "clova"}
    else:
        ds.pop("tensorboard", None)
    return ds


def zero_stage(template: dict, parallel: ParallelConfig) -> int:
    """The ZeRO stage a run uses: 3 in zero3 mode; in pipeline mode the template's 0 or 1 (default 1), never 2 or 3."""
    if parallel.mode == "zero3":
        return 3
    stage = (template.get("zero_optimization") or {}).get("stage")
    if stage in (2, 3):
        raise zero_with_pipeline(f"--parallel pipeline with a DeepSpeed config that asks for ZeRO stage {stage}")
    return stage if stage in (0, 1) else 1


def load_template(path: str | Path | None) -> dict:
    if path is None:
        return {}
    return read_json_object(path, "DeepSpeed config not found (templates: deepspeed_configs/zero3.json, zero3_offload.json)")
