"""DeepSpeed wiring kept out of the model: process groups, the DeepSpeed config, the engine.

The training loop sees one small interface, :class:`Engine` (train one global
batch, evaluate, save, load, set the learning rate), so a parallel mode is one
class here. ``zero3`` shards parameters, gradients and optimizer state over
the data-parallel ranks (optionally offloaded to CPU or NVMe) and builds the
model under ``deepspeed.zero.Init`` so no rank ever holds it whole.
``pipeline`` splits the layers into stages (DeepSpeed ``PipelineModule`` from
layer specs: token embedding, positions, blocks, final norm, and the head
tied to the token embedding) with ZeRO-1 across the data-parallel replicas;
DeepSpeed refuses ZeRO-2/3 with pipeline parallelism, which is why the modes
are exclusive. The same blocks and init serve both modes. :func:`pipeline_plan`
is the one description of the pipeline's layers: DeepSpeed's layer specs are
built from it, and so is the map from a pipeline checkpoint's parameter names
to the model's (:func:`pipeline_names`, :func:`pipeline_layer_names`).

On a machine without a GPU the same code runs on DeepSpeed's CPU accelerator
over gloo in fp32 with torch's AdamW ("torch_adam"), so no DeepSpeed op is
ever compiled there; on CUDA it is NCCL, bf16 and FusedAdam (DeepSpeedCPUAdam
under offload).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import read_json_object
from .errors import ClovaError
from .model import GPT, MLP, CausalSelfAttention, ModelConfig, init_weights

MODES = ("zero3", "pipeline")
OFFLOADS = ("none", "cpu", "nvme")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


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


# ------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO; our progress line says what matters."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*")
    # The pipeline engine's p2p broadcasts run inside autograd; its gradients are checked against ZeRO-3 in the tests.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")


def select_accelerator() -> None:
    """Pin DeepSpeed to the CPU accelerator when there is no GPU (it must be set before the import)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> Dist:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (set by launch.py)."""
    select_accelerator()
    import deepspeed
    import deepspeed.ops

    quiet_deepspeed()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # The CPU accelerator would JIT-compile a shared-memory all-reduce for
        # its torch backend; gloo is enough for CPU runs and needs no compiler.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    import torch.distributed as td

    return Dist(
        rank=td.get_rank(),
        world=td.get_world_size(),
        local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", td.get_world_size())),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


# ------------------------------------------------------------------ DeepSpeed config


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


# ------------------------------------------------------------------ model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and LayerNorm parameters are not decayed (GPT-3, Megatron-LM); told by module, whatever the names."""
    decay, plain, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            (plain if isinstance(module, torch.nn.LayerNorm) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# Modules whose parameters init_weights sets; under zero.Init each is gathered once.
_INIT_UNITS = (CausalSelfAttention, MLP, torch.nn.Embedding, torch.nn.LayerNorm)


def _layer_units(model: GPT) -> list[torch.nn.Module]:
    """The model in pipeline layer order (see pipeline_layers): wte, wpe, blocks, ln_f."""
    return [model.wte, model.wpe, *model.blocks, model.ln_f]


def _initialize_partitioned(model: GPT, cfg: ModelConfig, seed: int, rank: int) -> None:
    """Apply GPT-3 initialisation to a model whose parameters are already partitioned.

    zero.Init partitions each submodule as soon as it is built, so GPT's own
    ``init_weights`` pass finds empty tensors for everything but its direct
    parameters. Rank 0 draws each unit in full and DeepSpeed broadcasts it, so
    the weights do not depend on the number of ranks; layer i is drawn from
    ``seed + i`` in pipeline layer order, as PipelineEngine draws it, so both
    modes start from the same weights.
    """
    import deepspeed

    for i, layer in enumerate(_layer_units(model)):
        torch.manual_seed(seed + i)
        for module in layer.modules():
            if isinstance(module, _INIT_UNITS):
                with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                    if rank == 0:
                        init_weights(module, cfg)


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block keeps its input and recomputes the rest in backward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class Engine:
    """What the training loop needs from a parallel mode, around a DeepSpeed engine ``self.ds``."""

    ds: Any
    device: torch.device
    inject_nan: bool = False
    data_rank: int
    """This rank's data-parallel replica, and how many there are: they split each global batch."""
    data_world: int

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Forward, backward and one optimizer step over this replica's share; the mean loss."""
        raise NotImplementedError

    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the micro-batch mean losses, no gradients."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    @property
    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    @property
    def monitor(self):
        return self.ds.monitor

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        # `latest` is ours to write once the checkpoint is complete (see train.Checkpointer).
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: Path, tag: str) -> dict:
        path, client = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ClovaError(f"{directory / tag}: DeepSpeed could not load this checkpoint")
        return client


class Zero3Engine(Engine):
    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            torch.manual_seed(seed)
            model = GPT(model_cfg)
        _initialize_partitioned(model, model_cfg, seed, dist.rank)
        if parallel.activation_checkpointing:
            checkpoint_blocks(model)
        self.model = model
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay), config=ds_config)
        self.device = dist.device
        self.data_rank, self.data_world = dist.rank, dist.world

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device, non_blocking=True)
            loss = self.ds(mb[:, :-1], mb[:, 1:])
            if self.inject_nan:
                loss = loss * float("nan")
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        return total / len(micro_batches)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        self.ds.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device, non_blocking=True)
            total += self.ds(mb[:, :-1], mb[:, 1:]).float()
        self.ds.train()
        return total


# ------------------------------------------------------------------ pipeline


class TokenEmbedding(torch.nn.Module):
    """wte alone: the first stage embeds with it, the last stage's head reuses it (tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)  # (B, T) -> (B, T, C)


class PositionEmbedding(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wpe = torch.nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = torch.nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))


def _tied_head(embedding: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, embedding.wte.weight)  # (B, T, C) -> (B, T, vocab)


@dataclass(frozen=True)
class PipeLayer:
    """One layer of the pipeline, and where its parameters live in GPT."""

    module: type
    args: tuple
    ours: str | None
    """Prefix of this layer's parameter names in GPT ("blocks.0."); None: it owns none (it reuses a tied layer's)."""
    kwargs: dict = field(default_factory=dict)
    tied: str | None = None
    """Key shared by layers that use the same module (DeepSpeed's TiedLayerSpec)."""
    forward_fn: Callable | None = None
    """A tied layer's own forward, given the shared module."""

    def param_names(self) -> list[str]:
        with torch.device("meta"):  # names only: no memory, no initialisation cost
            return [n for n, _ in self.module(*self.args, **self.kwargs).named_parameters()]


def pipeline_plan(cfg: ModelConfig) -> list[PipeLayer]:
    """GPT as a list of pipeline layers: token embedding, positions, blocks, final norm, head tied to the embedding.

    Layer i of this list is layer i of the PipelineModule, and of its checkpoint.
    """
    from .model import Block

    return [
        PipeLayer(TokenEmbedding, (cfg,), ours="", tied="embed"),
        PipeLayer(PositionEmbedding, (cfg,), ours=""),
        *[PipeLayer(Block, (cfg,), ours=f"blocks.{i}.") for i in range(cfg.n_layer)],
        PipeLayer(torch.nn.LayerNorm, (cfg.n_embd,), ours="ln_f.", kwargs={"eps": cfg.layer_norm_eps}),
        PipeLayer(TokenEmbedding, (cfg,), ours=None, tied="embed", forward_fn=_tied_head),
    ]


def pipeline_layers(cfg: ModelConfig) -> list:
    """The pipeline plan as DeepSpeed layer specs."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = []
    for layer in pipeline_plan(cfg):
        if layer.tied:
            specs.append(TiedLayerSpec(layer.tied, layer.module, *layer.args, forward_fn=layer.forward_fn,
                                       tied_weight_attr=layer.param_names(), **layer.kwargs))
        else:
            specs.append(LayerSpec(layer.module, *layer.args, **layer.kwargs))
    return specs


def pipeline_layer_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each pipeline layer: its own parameter names (as in its checkpoint file) -> GPT names; {} if it owns none."""
    return [{n: layer.ours + n for n in layer.param_names()} if layer.ours is not None else {} for layer in pipeline_plan(cfg)]


def pipeline_names(cfg: ModelConfig) -> dict[str, str]:
    """PipelineModule parameter name -> GPT parameter name: layer i's under "i.", a tied layer's under "tied_modules.KEY."."""
    names = {}
    for i, (layer, own) in enumerate(zip(pipeline_plan(cfg), pipeline_layer_names(cfg))):
        prefix = f"tied_modules.{layer.tied}." if layer.tied else f"{i}."
        names.update({prefix + n: ours for n, ours in own.items()})
    return names


def check_partition(cfg: ModelConfig, parallel: ParallelConfig, stages: int) -> None:
    """Refuse a stage count or partition DeepSpeed would fail on, or leave a stage empty with, before any rank starts."""
    plan = pipeline_plan(cfg)
    owning = sum(layer.ours is not None for layer in plan)  # a stage holding only the tied head would own no weights
    if stages > owning:
        raise ClovaError(f"{stages} pipeline stages for {owning} layers with parameters; use fewer --pipeline-stages")
    kind, _, pattern = parallel.partition.partition(":")
    if kind != "type":
        return
    # DeepSpeed's rule: a case-insensitive search in the layer's class name; it balances the matching layers.
    matched = [layer.module.__name__ for layer in plan if re.search(pattern, layer.module.__name__, re.IGNORECASE)]
    if len(matched) < stages:
        classes = ", ".join(dict.fromkeys(layer.module.__name__ for layer in plan))
        raise ClovaError(
            f"--partition {parallel.partition} matches {len(matched)} of the pipeline's {len(plan)} layers ({classes}); "
            f"each of the {stages} stages needs one: try --partition type:Block or --partition parameters"
        )


class PipelineEngine(Engine):
    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        stages = parallel.stages(dist.world)
        module = PipelineModule(
            layers=pipeline_layers(model_cfg),
            num_stages=stages,
            loss_fn=self._loss,
            partition_method=parallel.partition,
            activation_checkpoint_interval=1 if parallel.activation_checkpointing else 0,
        )
        # Layer i is drawn from seed + i, so the weights do not depend on how layers fall into stages;
        # the tied embedding is drawn alike on the first and the last stage.
        for name, child in module.named_children():
            if name == "tied_modules":
                torch.manual_seed(seed)
                child.apply(lambda m: init_weights(m, model_cfg))
            elif name.isdigit():
                torch.manual_seed(seed + int(name))
                child.apply(lambda m: init_weights(m, model_cfg))
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(module, weight_decay), config=ds_config)
        self.device = dist.device
        self.data_rank, self.data_world = self.ds.grid.get_data_parallel_rank(), self.ds.grid.get_data_parallel_world_size()

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from .model import lm_loss

        loss = lm_loss(logits, targets)
        return loss * float("nan") if self.inject_nan else loss

    def _pairs(self, micro_batches: list[torch.Tensor]):
        return iter([(mb[:, :-1].to(self.device), mb[:, 1:].to(self.device)) for mb in micro_batches])

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        # Every stage and replica gets the mean loss back (the last stage broadcasts it).
        return self.ds.train_batch(data_iter=self._pairs(micro_batches)).float()

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        mean = self.ds.eval_batch(self._pairs(micro_batches), num_micro_batches=len(micro_batches))
        self.ds.train()
        return mean.float().reshape(()) * len(micro_batches)


def build_engine(model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist) -> Engine:
    engines = {"zero3": Zero3Engine, "pipeline": PipelineEngine}
    return engines[parallel.mode](model_cfg, ds_config, parallel, seed=seed, dist=dist)
