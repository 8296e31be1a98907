"""Will it fit, and how long will it take? Memory and time for a model on a cluster.

Model states follow DeepSpeed's own accounting (``estimate_zero3_model_states_mem_needs``):
with bf16 mixed precision a ZeRO-3 rank holds 18 bytes per parameter divided
by the data-parallel world plus the largest layer gathered in full (4 bytes
per parameter). In fp32 the 16-bit copies disappear: 16 bytes.

Activations follow what autograd actually saves for our block with fused
(flash) attention and no dropout: 16 values per token per hidden unit per
layer (measured with saved-tensor hooks, see tests/test_plan.py), plus the
logits (one value per token per vocabulary entry, kept in fp32 for the loss).
With activation checkpointing a layer keeps only its input, and one layer is
recomputed at a time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from clova_train.core.dtypes import PRECISIONS
from clova_train.core.errors import ClovaError
from clova_train.training.parallel.ds_config import MODES, OFFLOADS
from clova_train.model.config import PRESETS, ModelConfig, preset_name
from clova_train.model.gpt import flops_per_token, largest_unit_params, meta_model, num_params, part_sizes

GB = 1024**3
# Dense bf16 peak TFLOP/s per device, for MFU and time estimates.
ACCELERATOR_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "a10g": 125.0, "l40s": 362.0, "v100": 125.0}
# The CUDA context, NCCL buffers and allocator fragmentation take their share.
USABLE_FRACTION = 0.9
ACT_VALUES_PER_LAYER = 16  # x hidden x tokens, measured for model.Block
ACT_VALUES_OUTSIDE = 2  # embedding output and final LayerNorm input, x hidden x tokens
# With tensor parallelism the values inside attention and the MLP are split and the block's input, LayerNorm outputs and
# residuals are not: 24 of the 34 bytes per token per hidden unit Megatron-LM counts (Korthikanti et al. 2022, eq. 2).
ACT_SPLIT_FRACTION = 24 / 34


@dataclass
class PlanConfig:
    """The run to plan."""

    model: str = "1.3b"
    """Preset name from the presets table."""
    gpus: int = 8
    """GPUs per node."""
    gpu_mem: float = 80.0
    """Memory of one GPU in GB (GiB as nvidia-smi shows it)."""
    nodes: int = 1
    """Nodes."""
    cpu_mem: float = 1024.0
    """Host memory per node in GB (what CPU offload may use)."""
    parallel: str = "zero3"
    """zero3 (everything sharded over data-parallel ranks) or pipeline (layers in stages, ZeRO-1)."""
    pipeline_stages: int = 1
    """Pipeline stages (pipeline mode)."""
    tensor_parallel: int = 1
    """GPUs of one node that split each block's matrices (any mode)."""
    offload: str = "none"
    """ZeRO-3 offload of parameters and optimizer state: none, cpu or nvme."""
    seq_len: int | None = None
    """Tokens per sequence (None: the preset's own context, as `clova train` defaults to)."""
    micro_batch: int = 1
    """Sequences per GPU per forward pass."""
    vocab_size: int = 51200
    """Padded vocabulary size."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass, keeping only its input."""
    tokens: float = 150e9
    global_batch: int = 1024
    """Sequences per optimizer step (GPT-3: 1024); in pipeline mode it sets the micro-batches per step, hence the bubble."""
    """Tokens to train on (the paper's 82B model saw 150B)."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation for the time estimate."""
    peak_tflops: float = ACCELERATOR_PEAK_TFLOPS["a100"]
    """Peak dense TFLOP/s of one GPU at this precision."""

    def __post_init__(self) -> None:
        self.model = preset_name(self.model)
        if self.seq_len is None:
            self.seq_len = PRESETS[self.model].block_size
        if self.parallel not in MODES:
            raise ClovaError(f"parallel must be one of {', '.join(MODES)}, not {self.parallel!r}")
        if self.offload not in OFFLOADS:
            raise ClovaError(f"offload must be one of {', '.join(OFFLOADS)}, not {self.offload!r}")
        if self.precision not in PRECISIONS:
            raise ClovaError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.parallel != "zero3" and self.offload != "none":
            raise ClovaError(f"offload is a ZeRO-3 feature; {self.parallel} runs without offload")
        for f in ("gpus", "nodes", "pipeline_stages", "seq_len", "micro_batch", "vocab_size"):
            if getattr(self, f) < 1:
                raise ClovaError(f"{f} must be >= 1, not {getattr(self, f)}")
        if self.gpu_mem <= 0 or not 0 < self.mfu <= 1 or self.peak_tflops <= 0:
            raise ClovaError("gpu_mem and peak_tflops must be positive and mfu in (0, 1]")
        if self.tensor_parallel < 1 or self.gpus % self.tensor_parallel:
            raise ClovaError(f"--tensor-parallel {self.tensor_parallel} must divide the {self.gpus} GPUs of a node (a tensor-parallel group stays inside one)")
        if self.parallel == "pipeline" and (self.world // self.tensor_parallel) % self.pipeline_stages:
            raise ClovaError(f"{self.world} GPUs cannot be split into {self.pipeline_stages} pipeline stages of {self.tensor_parallel}-GPU tensor-parallel groups evenly")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


def tensor_parallel_params(m: ModelConfig) -> int:
    """Parameters tensor parallelism splits (the block matrices and their column biases), read off the model."""
    from clova_train.training.parallel.tensor import split_of

    return sum(p.numel() for name, p in meta_model(m).named_parameters() if split_of(name)[0] is not None)


def model_config(cfg: PlanConfig) -> ModelConfig:
    return ModelConfig.from_name(cfg.model, vocab_size=cfg.vocab_size, block_size=max(cfg.seq_len, 1))


def activation_bytes(m: ModelConfig, layers: int, tokens: int, act_bytes: int, checkpointing: bool, head: bool, tp: int = 1) -> int:
    """Saved activations of ``layers`` blocks for ``tokens`` tokens (micro-batch x seq_len) on one of ``tp`` tensor-parallel ranks."""
    th = tokens * m.n_embd
    per_layer = ACT_VALUES_PER_LAYER * (1 - ACT_SPLIT_FRACTION + ACT_SPLIT_FRACTION / tp)
    if checkpointing:
        values = layers * th + per_layer * th  # inputs kept + one block recomputed
    else:
        values = layers * per_layer * th
    values += ACT_VALUES_OUTSIDE * th
    total = values * act_bytes
    if head:
        # logits in the activation dtype, and the fp32 log-softmax the loss keeps
        total += tokens * m.vocab_size * (act_bytes + 4 if act_bytes != 4 else 4)
    return int(total)


def _state_bytes_per_param(precision: str, parallel: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter before sharding."""
    if precision == "fp32":
        return 4, 4, 8  # fp32 weights and grads, Adam moments
    if parallel == "zero2":
        # DeepSpeed's ZeRO-2 estimator: 16-bit weights in every rank, 18 sharded (16- and 32-bit
        # gradient partitions, fp32 master, moments); plus the fp32 accumulator our fp32 reduction
        # keeps for every parameter across micro-batches (``grad_accum``), 4 more.
        return 2, 4, 18
    if parallel == "zero1":
        # BF16_Optimizer: 16-bit weights and grads and the fp32 gradient buffer whole in every rank;
        # fp32 master weights and moments sharded.
        return 2, 6, 12
    if parallel == "zero3":
        # DeepSpeed's ZeRO-3 estimator charges 18 bytes in all: 16-bit weights
        # and grads, fp32 master weights and moments (12), and 2 more for its
        # fp32 gradient staging; we follow it so the two agree exactly.
        return 2, 2, 14
    # ZeRO-1 keeps 16-bit weights, 16-bit and fp32 grads in every replica and
    # shards the fp32 master weights and moments.
    return 2, 6, 12


def estimate(cfg: PlanConfig) -> dict:
    """Per-GPU memory breakdown, whether it fits, and the time to train ``cfg.tokens``."""
    m = model_config(cfg)
    n = num_params(m)
    act_bytes = 4 if cfg.precision == "fp32" else 2
    w, g, o = _state_bytes_per_param(cfg.precision, cfg.parallel)
    tokens_micro = cfg.micro_batch * cfg.seq_len
    largest = largest_unit_params(m)
    cpu_per_node = 0.0
    tp = cfg.tensor_parallel
    split = tensor_parallel_params(m)  # the block matrices each tensor-parallel rank holds a 1/tp slice of
    n_rank = n - split + split / tp
    acts = functools.partial(activation_bytes, m, tokens=tokens_micro, act_bytes=act_bytes, tp=tp)
    if cfg.parallel == "zero3":
        dp = cfg.world // tp
        gathered = 4 * largest  # DeepSpeed's "largest_layer_memory"
        if cfg.offload == "none":
            params, grads, optim = w * n_rank / dp + gathered, g * n_rank / dp, o * n_rank / dp
        else:
            # Parameters and optimizer state live on the host (or NVMe); the GPU
            # keeps the gathered working layer (DeepSpeed: cpu_offload_params=True).
            params, grads, optim = gathered, 0.0, 0.0
            cpu_per_node = 18 * n / cfg.nodes * 1.5 if cfg.offload == "cpu" else 0.0
        acts_ckpt = acts(m.n_layer, checkpointing=True, head=True)
        acts_full = acts(m.n_layer, checkpointing=False, head=True)
        stage_params = n_rank
    elif cfg.parallel in ("zero1", "zero2"):
        dp = cfg.world // tp
        params, grads, optim = w * n_rank, g * n_rank, o * n_rank / dp
        acts_ckpt = acts(m.n_layer, checkpointing=True, head=True)
        acts_full = acts(m.n_layer, checkpointing=False, head=True)
        stage_params = n_rank
    else:
        s = cfg.pipeline_stages
        dp = cfg.world // (s * tp)
        layers = math.ceil(m.n_layer / s)
        # The first stage holds the embeddings; with one stage it holds the whole model.
        if s == 1:
            stage_params = n_rank
        else:
            sizes = part_sizes(m)  # embeddings, blocks..., final norm, head
            block = sizes[2] - split / m.n_layer + split / m.n_layer / tp
            stage_params = layers * block + sizes[0] + sizes[1]
        # ZeRO-1: weights and gradients replicated in each replica, optimizer state
        # (fp32 master weights and Adam moments in mixed precision) sharded.
        params, grads = w * stage_params, g * stage_params
        optim = o * stage_params / dp
        # 1F1B keeps up to `s` micro-batches in flight on the first stage.
        in_flight = s
        acts_ckpt = acts(layers, checkpointing=True, head=s == 1) * in_flight
        acts_full = acts(layers, checkpointing=False, head=s == 1) * in_flight
    acts = acts_ckpt if cfg.activation_checkpointing else acts_full
    total = params + grads + optim + acts
    usable = cfg.gpu_mem * GB * USABLE_FRACTION
    host_ok = cpu_per_node <= cfg.cpu_mem * GB * USABLE_FRACTION
    flops_token = flops_per_token(m, cfg.seq_len)
    stages = cfg.pipeline_stages if cfg.parallel == "pipeline" else 1
    micro_batches = max(1, cfg.global_batch // (cfg.micro_batch * dp))
    # 1F1B: every stage idles (S-1) of the (M+S-1) slots of a step.
    bubble = (stages - 1) / (micro_batches + stages - 1)
    seconds = cfg.tokens * flops_token / (cfg.world * cfg.peak_tflops * 1e12 * cfg.mfu) / (1 - bubble)
    return {
        "config": asdict(cfg),
        "parameters": n,
        "largest_layer_parameters": largest,
        "data_parallel": dp,
        "stage_parameters": int(stage_params),
        "bytes": {
            "parameters": int(params),
            "gradients": int(grads),
            "optimizer": int(optim),
            "activations": int(acts),
            "activations_without_checkpointing": int(acts_full),
            "activations_with_checkpointing": int(acts_ckpt),
            "total": int(total),
            "usable": int(usable),
            "cpu_per_node": int(cpu_per_node),
        },
        "fits": total <= usable and host_ok,
        "host_fits": host_ok,
        "flops_per_token": flops_token,
        "train_seconds": seconds,
        "micro_batches_per_step": micro_batches,
        "pipeline_bubble": bubble,
    }


def suggest(cfg: PlanConfig) -> list[str]:
    """Smallest changes that make a run fit, tried in order of cost to throughput."""
    from dataclasses import replace

    out = []
    if not cfg.activation_checkpointing and estimate(replace(cfg, activation_checkpointing=True))["fits"]:
        out.append("--activation-checkpointing")
    if cfg.parallel == "zero3":
        for off in ("cpu", "nvme"):
            if off != cfg.offload and estimate(replace(cfg, offload=off, activation_checkpointing=True))["fits"]:
                out.append(f"--offload {off} --activation-checkpointing")
                break
    for s in range(2, min(cfg.world, model_config(cfg).n_layer) + 1):
        if cfg.world % s:
            continue
        trial = replace(cfg, parallel="pipeline", pipeline_stages=s, offload="none", activation_checkpointing=True)
        if estimate(trial)["fits"]:
            out.append(f"--parallel pipeline --pipeline-stages {s} --activation-checkpointing")
            break
    return out


def suggest_layout(cfg: PlanConfig) -> str | None:
    """The fastest layout that fits on this cluster: ZeRO-1/2 first (no gathers), then ZeRO-3, then the fewest pipeline stages (smallest bubble)."""
    from dataclasses import replace

    m = model_config(cfg)
    trials = [replace(cfg, parallel=p, pipeline_stages=1, offload="none") for p in ("zero1", "zero2", "zero3")]
    trials += [replace(cfg, parallel="pipeline", pipeline_stages=s, offload="none") for s in range(2, min(cfg.world, m.n_layer) + 1) if cfg.world % s == 0]
    for ckpt in (False, True):
        for t in trials:
            t = replace(t, activation_checkpointing=ckpt)
            est = estimate(t)
            if est["fits"]:
                flags = f"--parallel {t.parallel}" + (f" --pipeline-stages {t.pipeline_stages}" if t.parallel == "pipeline" else "")
                flags += " --activation-checkpointing" if ckpt else ""
                bubble = f", bubble {est['pipeline_bubble']:.0%} with {est['micro_batches_per_step']} micro-batches per step" if t.parallel == "pipeline" else ""
                return f"{flags} ({est['bytes']['total'] / GB:,.1f} GB per GPU{bubble}, {format_duration(est['train_seconds'])})"
    return None


def deepspeed_model_states(cfg: PlanConfig) -> tuple[int, int]:
    """DeepSpeed's own (cpu, gpu) estimate of ZeRO-3 model states, for comparison."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    m = model_config(cfg)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        num_params(m),
        largest_unit_params(m),
        num_gpus_per_node=cfg.gpus,
        num_nodes=cfg.nodes,
        cpu_offload=cfg.offload != "none",
        cpu_offload_params=cfg.offload != "none",
        zero_init=True,
    )
    return cpu, gpu


def format_duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def plan_table(est: dict, fixes: list[str], *, devices: str = "GPUs", per: str = "GPU", time: bool = True):
    """The plan as a rich Table: `clova plan` prints it, and `clova train` before step 1.

    ``devices`` names what one rank runs on in the title and ``per`` the unit of the
    per-device rows ("rank" on CPU ranks); ``time`` adds the training-time row (off
    when the device's peak TFLOP/s is unknown).
    """
    from rich.table import Table

    c, b = est["config"], est["bytes"]
    mode = c["parallel"] + (f", {c['pipeline_stages']} stages" if c["parallel"] == "pipeline" else "")
    mode += f", tensor parallel {c['tensor_parallel']}" if c.get("tensor_parallel", 1) > 1 else ""
    mode += f", offload {c['offload']}" if c["offload"] != "none" else ""
    memory = f"{c['gpu_mem']:,.1f}".removesuffix(".0")
    title = f"plan: {c['model']} on {c['nodes']} x {c['gpus']} {devices} of {memory} GB ({mode}, {c['precision']})"
    table = Table(title=title, show_header=False)
    table.add_row("parameters", f"{est['parameters']:,}")
    table.add_row("data-parallel ranks", f"{est['data_parallel']}")
    for k in ("parameters", "gradients", "optimizer"):
        table.add_row(f"{k} per {per}", f"{b[k] / GB:,.2f} GB")
    table.add_row(f"activations per {per}", f"{b['activations'] / GB:,.2f} GB (checkpointing: {b['activations_with_checkpointing'] / GB:,.2f} GB, none: {b['activations_without_checkpointing'] / GB:,.2f} GB)")
    table.add_row(f"total per {per}", f"{b['total'] / GB:,.2f} GB of {b['usable'] / GB:,.2f} GB usable")
    if b["cpu_per_node"]:
        table.add_row("host memory per node", f"{b['cpu_per_node'] / GB:,.1f} GB of {c['cpu_mem']:g} GB" + ("" if est["host_fits"] else " [red](too much)[/]"))
    table.add_row("fits", "[green]yes[/]" if est["fits"] else "[red]no[/]")
    for f in fixes:
        table.add_row("would fit with", f)
    if not est["fits"] and not fixes:
        table.add_row("would fit with", "more GPUs (no stage count or offload on this cluster is enough)")
    if c["parallel"] == "pipeline":
        table.add_row("pipeline bubble", f"{est['pipeline_bubble']:.1%} (1F1B, {c['pipeline_stages']} stages, {est['micro_batches_per_step']} micro-batches per step)")
    if est.get("layout"):
        table.add_row("fastest layout that fits", est["layout"])
    if time:
        table.add_row(f"time for {c['tokens']:.3g} tokens", f"{format_duration(est['train_seconds'])} at {c['mfu']:.0%} MFU of {c['peak_tflops']:g} TFLOP/s")
    return table
