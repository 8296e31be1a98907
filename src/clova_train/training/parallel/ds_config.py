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
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import block_matrix_params

MODES = ("zero1", "zero2", "zero3", "pipeline")
# The ZeRO stage of each data-parallel mode (pipeline mode takes the template's 0 or 1).
ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
REDUCE_DTYPES = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu", "nvme")
PRECISIONS = ("auto", *dtypes.PRECISIONS)


@dataclass
class ParallelConfig:
    """How the model is spread over devices."""

    mode: str = "zero3"
    """zero1/zero2/zero3: optimizer state, then gradients, then parameters sharded over all ranks; pipeline: layers split into stages, ZeRO-1 across replicas."""
    offload: str = "none"
    """ZeRO-3 offload of parameters and optimizer state: none, cpu or nvme."""
    nvme_path: str = "/local_nvme"
    """Directory on a local NVMe drive, for --offload nvme."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations."""
    pipeline_stages: int = 0
    """Pipeline stages in pipeline mode (0: one per tensor-parallel group); the ranks divide into stages x replicas x tensor_parallel."""
    tensor_parallel: int = 1
    """Ranks that split each block's matrices (Megatron's tensor parallelism); consecutive ranks, so a group stays inside a node."""
    partition: str = "parameters"
    """How pipeline mode cuts the layers into stages: parameters (equal parameter counts), uniform (equal layer counts) or type:REGEX (equal counts of the layers whose class matches, e.g. type:Block)."""
    reduce_dtype: str = "fp32"
    """Under bf16/fp16: dtype gradients are accumulated over micro-batches and reduced across ranks in; fp32 (exact sums, Megatron-LM's choice) or the training precision (less memory and traffic, 8-bit mantissa sums under bf16)."""
    compile: bool = False
    """torch.compile each transformer block (first steps pay the compilation)."""
    chosen: str = ""
    """Why `clova train --parallel auto` chose this layout (empty when the layout was given)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ClovaError(f"parallel mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.offload not in OFFLOADS:
            raise ClovaError(f"offload must be one of {', '.join(OFFLOADS)}, not {self.offload!r}")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ClovaError(f"reduce_dtype must be one of {', '.join(REDUCE_DTYPES)}, not {self.reduce_dtype!r}")
        if self.mode != "zero3" and self.offload != "none":
            engine = "DeepSpeed's pipeline engine runs ZeRO-1" if self.mode == "pipeline" else f"clova offloads under ZeRO-3 only, not {self.mode}"
            raise ClovaError(
                f"--offload {self.offload} is a ZeRO-3 feature and {engine}: "
                "drop --offload, or use --parallel zero3 --offload " + self.offload
            )
        if self.mode in ZERO_STAGES and self.pipeline_stages > 1:
            raise zero_with_pipeline(f"ZeRO-{ZERO_STAGES[self.mode]} with {self.pipeline_stages} pipeline stages")
        if self.pipeline_stages < 0:
            raise ClovaError(f"pipeline_stages must be >= 0, not {self.pipeline_stages}")
        if self.tensor_parallel < 1:
            raise ClovaError(f"--tensor-parallel must be >= 1, not {self.tensor_parallel}")
        _check_partition_syntax(self.partition)
        if self.mode != "pipeline" and self.partition != "parameters":
            raise ClovaError(f"--partition {self.partition} cuts pipeline stages and ZeRO-{ZERO_STAGES[self.mode]} has none; add --parallel pipeline or drop --partition")

    def stages(self, world: int) -> int:
        """Pipeline stages on ``world`` ranks (1 in the ZeRO modes)."""
        tp = self.tensor_parallel
        if world % tp:
            raise ClovaError(f"{world} ranks cannot form tensor-parallel groups of {tp}; use a --tensor-parallel that divides {world}")
        if self.mode != "pipeline":
            return 1
        groups = world // tp
        stages = self.pipeline_stages or groups
        if groups % stages:
            raise ClovaError(f"{world} ranks cannot form {stages} pipeline stages evenly; use a --pipeline-stages that divides {groups}"
                             + (f" ({world} ranks / --tensor-parallel {tp})" if tp > 1 else ""))
        return stages

    def replicas(self, world: int) -> int:
        """Data-parallel replicas on ``world`` ranks: what is left after stages and tensor-parallel groups."""
        return world // (self.stages(world) * self.tensor_parallel)


def zero_with_pipeline(asked: str) -> ClovaError:
    """The one refusal of ZeRO-2/3 together with pipeline stages, whichever way they were asked for."""
    return ClovaError(
        f"{asked}: DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only (ZeRO-2/3 would shard the gradients and "
        "weights each stage must hold whole); choose --parallel zero3 (ZeRO-3 over all ranks, no stages; or zero1/zero2) or "
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
        if stage not in (0, 1, 2, 3):
            raise ClovaError(
                f"the DeepSpeed template sets ZeRO stage {stage}; use 1, 2 or 3 (--parallel zero1/zero2/zero3) or 0/1 with the "
                "pipeline engine (--parallel pipeline), which refuses ZeRO-2/3"
            )
        # Stage 0 runs only under the pipeline engine; stage 1 is ZeRO-1 data parallelism unless the template has a pipeline section.
        piped = stage == 0 or (stage == 1 and "pipeline" in template)
        par["mode"] = "pipeline" if piped else f"zero{stage}"
    if isinstance(stages, int):
        par["pipeline_stages"] = stages
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device")
        if given(dev) and dev != "none":
            par["offload"] = dev
            if dev == "nvme" and given(zero[key].get("nvme_path")):
                par["nvme_path"] = zero[key]["nvme_path"]
    return train, par


def deepspeed_config(template: dict, train, parallel: ParallelConfig, *, world: int, cuda: bool, tensorboard_dir: str | None,
                     model: ModelConfig | None = None) -> dict:
    """The DeepSpeed config of a run: the template, with every setting clova owns written from our configs.

    ``model`` sizes the ZeRO buckets the template leaves unset or "auto".
    """
    ds = copy.deepcopy(template)
    replicas = parallel.replicas(world)
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
    ds.update(reduction_dtypes(precision, parallel.reduce_dtype, zero["stage"]))
    for key, value in bucket_sizes(model, zero["stage"]).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
            if value is None:  # no model to size it by: DeepSpeed's own default
                del zero[key]
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


def reduction_dtypes(precision: str, reduce_dtype: str, stage: int) -> dict:
    """DeepSpeed's ``data_types.grad_accum_dtype`` and ``communication_data_type`` for a run.

    Unset, DeepSpeed 0.19 accumulates and reduces in the model's dtype: under
    bf16 each micro-batch's gradients are summed into an 8-bit-mantissa buffer.
    fp32 here makes ZeRO-1 (and pipeline ZeRO-1) run DeepSpeed's BF16_Optimizer
    with fp32 gradient buffers, ZeRO-2 accumulate in an fp32 ``grad_accum``
    per parameter, and ZeRO-3 keep its gradient partitions in fp32.
    """
    if precision == "fp32":
        return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    if reduce_dtype not in ("fp32", precision):
        raise ClovaError(f"--reduce-dtype {reduce_dtype} under {precision} training: DeepSpeed accumulates in fp32 or the model's dtype; use --reduce-dtype fp32 or {precision}")
    if reduce_dtype == "fp32" and stage == 0:
        # DeepSpeed raises NotImplementedError for 16-bit weights with fp32 accumulation outside ZeRO.
        raise ClovaError(f"ZeRO stage 0 under {precision} accumulates gradients in {precision} only; use ZeRO stage 1 "
                         f"(deepspeed_configs/pipeline_zero1.json) or pass --reduce-dtype {precision}")
    return {"data_types": {"grad_accum_dtype": reduce_dtype}, "communication_data_type": reduce_dtype}


# DeepSpeed's own defaults, as the floor of the persistence threshold and the cap of a bucket.
PERSISTENCE_FLOOR = 100_000
BUCKET_CAP = 500_000_000


def bucket_sizes(model: ModelConfig | None, stage: int) -> dict[str, int | None]:
    """ZeRO bucket and prefetch sizes (elements) from the model's blocks, where the template leaves them "auto".

    A GPT-3 block's matrices hold 12 d^2 parameters: prefetching one block lets the next
    block's gather overlap this block's compute, and a reduce bucket of two
    blocks lets block i's reduction overlap block i-1's backward, from 49K
    elements for the tiny preset to DeepSpeed's 5e8 cap for 82B (a fixed
    5e7 is a whole tiny model and a twentieth of an 82B block). Tensors
    under max(1e5, 10 d) elements (biases, LayerNorms) stay resident.
    """
    keys = ["reduce_bucket_size", *(["stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"] if stage == 3 else ["allgather_bucket_size"])]
    if model is None:
        return dict.fromkeys(keys)
    block = block_matrix_params(model)
    sizes = {"reduce_bucket_size": min(2 * block, BUCKET_CAP), "allgather_bucket_size": min(2 * block, BUCKET_CAP),
             "stage3_prefetch_bucket_size": min(block, BUCKET_CAP), "stage3_param_persistence_threshold": max(PERSISTENCE_FLOOR, 10 * model.n_embd)}
    return {k: sizes[k] for k in keys}


def zero_stage(template: dict, parallel: ParallelConfig) -> int:
    """The ZeRO stage a run uses: that of zero1/2/3 mode; in pipeline mode the template's 0 or 1 (default 1), never 2 or 3."""
    if parallel.mode in ZERO_STAGES:
        return ZERO_STAGES[parallel.mode]
    stage = (template.get("zero_optimization") or {}).get("stage")
    if stage in (2, 3):
        raise zero_with_pipeline(f"--parallel pipeline with a DeepSpeed config that asks for ZeRO stage {stage}")
    return stage if stage in (0, 1) else 1


def load_template(path: str | Path | None) -> dict:
    if path is None:
        return {}
    return read_json_object(path, "DeepSpeed config not found (templates: deepspeed_configs/zero3.json, zero3_offload.json)")
