"""The run to plan (:class:`PlanConfig`) and the facts about its model the planner needs, read off the model itself."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

from clova_train.core.config import from_dict
from clova_train.core.dtypes import PRECISIONS
from clova_train.core.errors import ClovaError
from clova_train.model.config import LLAMA_FIELDS, PRESETS, ModelConfig, preset_name
from clova_train.model.gpt import flops_per_token, largest_unit_params, meta_model, num_params, part_sizes
from clova_train.training.parallel.ds_config import MODES, OFFLOADS, REDUCE_DTYPES
from clova_train.training.planner.hardware import GPUProfile, profile

GB = 1024**3


@dataclass
class PlanConfig:
    """The run to plan: model, cluster, layout, batch and hardware figures."""

    model: str = "1.3b"
    """Preset name from the presets table, or "custom" with every shape field in ``shape``."""
    shape: dict = field(default_factory=dict)
    """ModelConfig fields over the preset's (n_layer, n_embd, n_head...: a model config file or the shape flags)."""
    gpus: int = 8
    """GPUs per node."""
    gpu_mem: float | None = None
    """Memory of one GPU in GB (GiB as nvidia-smi shows it; None: the GPU type's)."""
    nodes: int = 1
    """Nodes."""
    cpu_mem: float = 1024.0
    """Host memory per node in GB (what CPU offload may use)."""
    parallel: str = "zero3"
    """zero1, zero2, zero3 (sharded over data-parallel ranks) or pipeline (layers in stages, ZeRO-1)."""
    pipeline_stages: int = 1
    """Pipeline stages (pipeline mode)."""
    tensor_parallel: int = 1
    """GPUs of one node that split each block's matrices (any mode)."""
    offload: str = "none"
    """ZeRO-3 offload of parameters and optimizer state: none, cpu or nvme."""
    seq_len: int | None = None
    """Tokens per sequence (None: the model's own context, as `clova train` defaults to)."""
    micro_batch: int = 1
    """Sequences per GPU per forward pass."""
    vocab_size: int | None = None
    """Padded vocabulary size (None: the model's, 51200 for the presets)."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    reduce_dtype: str = "fp32"
    """Dtype gradients are reduced in (clova train's default fp32; bf16/fp16 halve the traffic)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass, keeping only its input."""
    tokens: float = 150e9
    """Tokens to train on (the paper's 82B model saw 150B)."""
    global_batch: int = 1024
    """Sequences per optimizer step (GPT-3: 1024); sets the micro-batches per step, hence the bubble."""
    gpu_type: str = "a100"
    """Hardware profile: a100, a100-40, h100, h200, a10g, l40s, v100 or cpu."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one GPU (None: the profile's)."""
    intra_node_gbps: float | None = None
    """Per-GPU bandwidth inside a node, GB/s (None: the profile's)."""
    inter_node_gbps: float | None = None
    """Per-GPU bandwidth between nodes, GB/s (None: the profile's)."""
    kernel_efficiency: float | None = None
    """Fraction of peak the block's matmuls reach (None: measured by --calibrate, else the profile's)."""

    def __post_init__(self) -> None:
        if self.model != "custom":
            self.model = preset_name(self.model)
        elif not self.shape:
            raise ClovaError("a custom model needs its shape: a model config file or --n-layer/--n-embd/--n-head")
        if self.parallel not in MODES:
            raise ClovaError(f"parallel must be one of {', '.join(MODES)}, not {self.parallel!r}")
        if self.offload not in OFFLOADS:
            raise ClovaError(f"offload must be one of {', '.join(OFFLOADS)}, not {self.offload!r}")
        if self.precision not in PRECISIONS:
            raise ClovaError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ClovaError(f"reduce_dtype must be one of {', '.join(REDUCE_DTYPES)}, not {self.reduce_dtype!r}")
        if self.parallel != "zero3" and self.offload != "none":
            raise ClovaError(f"offload is a ZeRO-3 feature; {self.parallel} runs without offload")
        m = model_config(self)  # a bad shape answers here, in one line
        if self.seq_len is None:
            self.seq_len = m.block_size
        for f in ("gpus", "nodes", "pipeline_stages", "seq_len", "micro_batch", "global_batch"):
            if getattr(self, f) < 1:
                raise ClovaError(f"{f} must be >= 1, not {getattr(self, f)}")
        if self.gpu_mem is not None and self.gpu_mem <= 0:
            raise ClovaError(f"gpu_mem must be positive, not {self.gpu_mem}")
        self.hardware  # an unknown GPU type or a bad override answers now
        if self.tensor_parallel < 1 or self.gpus % self.tensor_parallel:
            raise ClovaError(f"--tensor-parallel {self.tensor_parallel} must divide the {self.gpus} GPUs of a node (a tensor-parallel group stays inside one)")
        if self.parallel == "pipeline" and (self.world // self.tensor_parallel) % self.pipeline_stages:
            raise ClovaError(f"{self.world} GPUs cannot be split into {self.pipeline_stages} pipeline stages of {self.tensor_parallel}-GPU tensor-parallel groups evenly")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def hardware(self) -> GPUProfile:
        return profile(self.gpu_type, peak_tflops=self.peak_tflops, intra_node_gbps=self.intra_node_gbps,
                       inter_node_gbps=self.inter_node_gbps, kernel_efficiency=self.kernel_efficiency)

    @property
    def memory_gb(self) -> float:
        return self.gpu_mem if self.gpu_mem is not None else self.hardware.memory_gb

    @property
    def stages(self) -> int:
        return self.pipeline_stages if self.parallel == "pipeline" else 1

    @property
    def data_parallel(self) -> int:
        return self.world // (self.stages * self.tensor_parallel)

    def as_dict(self) -> dict:
        return {**asdict(self), "gpu_mem": self.memory_gb, "seq_len": self.seq_len}


def model_config(cfg: PlanConfig) -> ModelConfig:
    """The model as `clova train` builds it: the preset (or the custom shape) with its own position table, longer only
    for a longer --seq-len (so the plan's parameter count is the model's)."""
    # A preset's depth and width; the fields its arch derives (KV heads, MLP width, tying) follow the arch asked for.
    base = {k: v for k, v in asdict(PRESETS[cfg.model]).items() if k not in LLAMA_FIELDS} if cfg.model in PRESETS else {"name": "custom"}
    fields = {**base, **cfg.shape}
    if cfg.vocab_size is not None:
        fields["vocab_size"] = cfg.vocab_size
    m = from_dict(ModelConfig, fields, where="plan", section="model")
    return replace(m, block_size=max(cfg.seq_len or m.block_size, m.block_size))


@dataclass(frozen=True)
class ModelFacts:
    """What the planner reads off one model at one sequence length (cached: the search asks for them hundreds of times)."""

    params: int
    tp_split: int
    """Parameters tensor parallelism splits (the block matrices and their column biases)."""
    largest_unit: int
    part_sizes: tuple[int, ...]
    flops_per_token: float
    """Training FLOPs per token without recompute (6N + attention), from the model."""
    recompute_flops_per_token: float
    """The blocks' forward again, what activation checkpointing adds per token."""
    n_layer: int
    width: int
    """The residual stream's width: what one token's activation is between blocks and across a stage boundary."""


@functools.lru_cache(maxsize=64)
def model_facts(m: ModelConfig, seq_len: int) -> ModelFacts:
    from clova_train.training.parallel.tensor import split_of

    model = meta_model(m)
    split = sum(p.numel() for name, p in model.named_parameters() if split_of(name)[0] is not None)
    # One block's training FLOPs per token: the model's count at two layers less that at one (read off the model,
    # not a second formula); its forward is a third of it (backward is twice the forward).
    block = flops_per_token(replace(m, n_layer=2), seq_len) - flops_per_token(replace(m, n_layer=1), seq_len)
    return ModelFacts(
        params=num_params(m), tp_split=split, largest_unit=largest_unit_params(m), part_sizes=tuple(part_sizes(m)),
        flops_per_token=flops_per_token(m, seq_len), recompute_flops_per_token=m.n_layer * block / 3,
        n_layer=m.n_layer, width=m.n_embd,
    )


def shape_from_file(path: str) -> dict:
    """ModelConfig fields from a JSON file: a model config object, or a run's config.json (its "model" section); checked strictly."""
    from clova_train.core.config import read_json_object

    data = read_json_object(path)
    fields = data["model"] if isinstance(data.get("model"), dict) else data
    from_dict(ModelConfig, fields, where=str(path), section="model" if fields is not data else None)
    return dict(fields)
