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
are exclusive. The same blocks and init serve both modes; ``PIPELINE_NAMES``
maps a pipeline checkpoint's parameter names to the model's.

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
            raise ClovaError("--pipeline-stages needs --parallel pipeline (DeepSpeed's pipeline engine cannot run ZeRO-3)")
        if self.pipeline_stages < 0:
            raise ClovaError(f"pipeline_stages must be >= 0, not {self.pipeline_stages}")

    def stages(self, world: int) -> int:
        """Pipeline stages on ``world`` ranks (1 in zero3 mode)."""
        if self.mode != "pipeline":
            return 1
        stages = self.pipeline_stages or world
        if world % stages:
            raise ClovaError(f"{world} ranks cannot form {stages} pipeline stages evenly; use a --pipeline-stages that divides {world}")
        return stages


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
    if given(stage):
        if stage not in (0, 1, 3):
            raise ClovaError(
                f"the DeepSpeed template sets ZeRO stage {stage}; use 3 (--parallel zero3) or 0/1 with the "
                "pipeline engine (--parallel pipeline), which refuses ZeRO-2/3"
            )
        par["mode"] = "zero3" if stage == 3 else "pipeline"
    stages = (template.get("pipeline") or {}).get("stages")
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
    if parallel.mode == "pipeline":
        zero["stage"] = zero.get("stage") if zero.get("stage") in (0, 1) else 1
    else:
        zero["stage"] = 3
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


def load_template(path: str | Path | None) -> dict:
    if path is None:
        return {}
    import json

    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: DeepSpeed config not found (templates: deepspeed_configs/zero3.json, zero3_offload.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ClovaError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ClovaError(f"{path}: a DeepSpeed config is a JSON object")
    return data


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


def pipeline_layers(cfg: ModelConfig) -> list:
    """GPT as DeepSpeed layer specs: token embedding, positions, blocks, final norm, tied head."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from .model import Block

    return [
        TiedLayerSpec("embed", TokenEmbedding, cfg, tied_weight_attr=["wte.weight"]),
        LayerSpec(PositionEmbedding, cfg),
        *[LayerSpec(Block, cfg) for _ in range(cfg.n_layer)],
        LayerSpec(torch.nn.LayerNorm, cfg.n_embd, eps=cfg.layer_norm_eps),
        TiedLayerSpec("embed", TokenEmbedding, cfg, forward_fn=_tied_head, tied_weight_attr=["wte.weight"]),
    ]


def pipeline_names(cfg: ModelConfig) -> dict[str, str]:
    """PipelineModule parameter name -> GPT parameter name (layer i of pipeline_layers is module "i")."""
    names = {"tied_modules.embed.wte.weight": "wte.weight", "1.wpe.weight": "wpe.weight"}
    for i in range(cfg.n_layer):
        for sub in ("ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.fc", "mlp.proj"):
            for w in ("weight", "bias"):
                names[f"{i + 2}.{sub}.{w}"] = f"blocks.{i}.{sub}.{w}"
    for w in ("weight", "bias"):
        names[f"{cfg.n_layer + 2}.{w}"] = f"ln_f.{w}"
    return names


class PipelineEngine(Engine):
    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        stages = parallel.stages(dist.world)
        module = PipelineModule(
            layers=pipeline_layers(model_cfg),
            num_stages=stages,
            loss_fn=self._loss,
            partition_method="parameters",
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
