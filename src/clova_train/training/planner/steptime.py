"""Time of one optimizer step for one layout: compute + exposed communication + the 1F1B bubble.

Per GPU and per step, with ``m`` micro-batches per pipeline replica (global batch / (micro-batch x replicas)):

- compute: the step's FLOPs (the model's 6N + attention per token, plus the blocks' forward again under
  activation checkpointing) at the profile's kernel efficiency of the peak;
- tensor parallelism: Megatron's all-reduces of the block's output, 2 forward and 2 backward per block
  per micro-batch (2 more when the forward is recomputed), ring cost 2(t-1)/t, on the node's NVLink,
  never hidden (each feeds the next matmul);
- pipeline: each micro-batch's activation forward and its gradient back across a stage boundary
  (over the network when stages sit on different nodes), and the 1F1B bubble: (p-1) micro-batch slots
  in which a stage waits, for m slots of work;
- data parallelism at the configured reduce dtype: ZeRO-1 and pipeline replicas all-reduce gradients
  (2(d-1)/d) and all-gather the updated 16-bit weights ((d-1)/d) once per step; ZeRO-2 reduce-scatters
  instead; ZeRO-3 gathers the 16-bit weights before the forward and again before the backward (and for the
  recomputed forward) and reduce-scatters gradients, every micro-batch. A group inside one node runs at
  NVLink speed, one that spans nodes at the network's.

Collectives reach :data:`~clova_train.training.planner.hardware.LINK_EFFICIENCY` of the link.
"""

from __future__ import annotations

from clova_train.training.planner.config import PlanConfig, model_config, model_facts
from clova_train.training.planner.hardware import LINK_EFFICIENCY

# ZeRO-3's gathers and reduce-scatters run on their own CUDA streams, prefetched a block ahead (overlap_comm,
# stage3_prefetch_bucket_size), so most of their time hides behind the matmuls: this fraction of the smaller of
# (communication, compute) is hidden. Not all of it: the first block's gather, the last bucket's reduction and
# the step's synchronisation stay exposed. Set from the ZeRO-3 rows of the published-runs table.
ZERO3_OVERLAP = 0.8
# ZeRO-1/2 and the pipeline engine reduce gradients after the last micro-batch's backward, with nothing left to
# overlap them with (DeepSpeed's BF16_Optimizer and PipelineEngine both reduce at the step boundary): all exposed.
GRAD_REDUCE_OVERLAP = 0.0
# CPU offload: the optimizer step runs on the host (DeepSpeed's CPU Adam, about 1e9 parameters/s per node with
# AVX-512) and weights and gradients cross PCIe (about 20 GB/s per GPU): all exposed (the gathers wait for them).
CPU_ADAM_PARAMS_PER_SECOND = 1e9
PCIE_GBPS = 20.0

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def step_time(cfg: PlanConfig) -> dict:
    """Seconds per step of ``cfg``'s layout, split into compute, exposed communication and bubble, and what they give."""
    hw = cfg.hardware
    m = model_config(cfg)
    f = model_facts(m, cfg.seq_len)
    tp, pp, dp = cfg.tensor_parallel, cfg.stages, cfg.data_parallel
    micro = max(1, cfg.global_batch // (cfg.micro_batch * dp))
    tokens_micro = cfg.micro_batch * cfg.seq_len
    flops_token = f.flops_per_token + (f.recompute_flops_per_token if cfg.activation_checkpointing else 0.0)
    speed = hw.peak_tflops * 1e12 * hw.kernel_efficiency
    compute_micro = tokens_micro * flops_token / (tp * pp) / speed
    act = DTYPE_BYTES[cfg.precision]
    nvlink = hw.intra_node_gbps * 1e9 * LINK_EFFICIENCY
    network = hw.inter_node_gbps * 1e9 * LINK_EFFICIENCY

    # Tensor parallelism: all-reduces of (micro-batch x seq x width) per block on this stage.
    layers = f.n_layer / pp
    per_block = 4 + (2 if cfg.activation_checkpointing else 0)
    tp_micro = layers * per_block * 2 * _ring(tp) * tokens_micro * f.width * act / nvlink if tp > 1 else 0.0

    # Pipeline: one activation forward and one gradient back per micro-batch; stages are the slowest rank axis,
    # so neighbours share a node only when a whole stage (dp x tp GPUs) is smaller than a node.
    stage_gpus = dp * tp
    p2p_link = nvlink if stage_gpus < cfg.gpus and cfg.world > 1 and cfg.gpus % stage_gpus == 0 else network
    p2p_micro = 2 * tokens_micro * f.width * act / p2p_link if pp > 1 else 0.0

    slot = compute_micro + tp_micro + p2p_micro
    compute = micro * compute_micro
    exposed = micro * (tp_micro + p2p_micro)
    bubble = (pp - 1) * slot

    # Data parallelism over the dp ranks that hold the same slice (tensor rank, stage): consecutive tensor ranks
    # share a node, so a dp group stays inside it only when dp x tp fits in one.
    n_rank = (f.params - f.tp_split + f.tp_split / tp) / pp
    dp_link = nvlink if dp * tp <= cfg.gpus else network
    red = DTYPE_BYTES[cfg.reduce_dtype if cfg.precision != "fp32" else "fp32"]
    comm_dp = 0.0
    gathers = 2 + (1 if cfg.activation_checkpointing else 0)  # ZeRO-3: the recomputed forward gathers again
    if dp > 1 and cfg.parallel == "zero3":
        per_micro = (gathers * act + red) * n_rank * _ring(dp) / dp_link
        comm_dp = micro * per_micro
        hidden = ZERO3_OVERLAP * min(comm_dp, compute)
        exposed += comm_dp - hidden
    elif dp > 1:
        reduce = (2 if cfg.parallel in ("zero1", "pipeline") else 1) * red * n_rank * _ring(dp)
        gather = act * n_rank * _ring(dp)
        comm_dp = (reduce + gather) / dp_link
        exposed += comm_dp * (1 - GRAD_REDUCE_OVERLAP)
    offload = 0.0
    if cfg.offload != "none":
        # Each gather first brings this rank's shard up from the host; once per step the fp32 gradients go down and the
        # optimizer runs on the node's CPUs.
        shard = n_rank / dp
        offload = (micro * gathers * act + 4) * shard / (PCIE_GBPS * 1e9) + shard * cfg.gpus / CPU_ADAM_PARAMS_PER_SECOND
        exposed += offload

    step = compute + exposed + bubble
    tokens_step = micro * dp * tokens_micro
    world = cfg.world
    peak = hw.peak_tflops * 1e12
    model_flops = tokens_step * f.flops_per_token / step / world
    hardware_flops = tokens_step * flops_token / step / world
    return {
        "step_seconds": step,
        "tokens_per_step": tokens_step,
        "micro_batches_per_step": micro,
        "tokens_per_second": tokens_step / step,
        "model_tflops_per_gpu": model_flops / 1e12,
        "hardware_tflops_per_gpu": hardware_flops / 1e12,
        "mfu": model_flops / peak,
        "time_split": {"compute": compute, "communication": exposed, "bubble": bubble},
        "communication_total": comm_dp + micro * (tp_micro + p2p_micro) + offload,
        "pipeline_bubble": bubble / step,
        "flops_per_token": f.flops_per_token,
        "hardware_flops_per_token": flops_token,
    }


def train_seconds(cfg: PlanConfig, t: dict) -> float:
    """Seconds to train ``cfg.tokens`` at the step time ``t``."""
    return cfg.tokens / t["tokens_per_second"]
