"""Memory per GPU of one layout.

Model states follow DeepSpeed's own accounting (``estimate_zero3_model_states_mem_needs``):
with bf16 mixed precision a ZeRO-3 rank holds 18 bytes per parameter divided
by the data-parallel world plus the largest layer gathered in full (4 bytes
per parameter). In fp32 the 16-bit copies disappear: 16 bytes.

Activations follow what autograd actually saves for our blocks with fused
(flash) attention and no dropout (measured with saved-tensor hooks, see
tests/test_plan.py): per token per layer, 8 x d_model + 2 x the MLP width for
the gpt3 block (16 x d_model), 10 x d_model + 4 x the MLP width for the llama
block (its fp32 RMSNorm, the key/value heads repeated for attention, and
SwiGLU's gate, up, activation and product), plus the
logits (one value per token per vocabulary entry, kept in fp32 for the loss).
With activation checkpointing a layer keeps only its input, and one layer is
recomputed at a time.
"""

from __future__ import annotations

import functools
import math

from clova_train.model.config import ModelConfig
from clova_train.training.planner.config import GB, PlanConfig, model_config, model_facts

# The CUDA context, NCCL buffers and allocator fragmentation take their share.
USABLE_FRACTION = 0.9
# Values saved per token per block: (x d_model, x MLP width), measured for each arch's block.
ACT_VALUES_PER_LAYER = {"gpt3": (8, 2), "llama": (10, 4)}
ACT_VALUES_OUTSIDE = 2  # embedding output and final norm input, x hidden x tokens
# With tensor parallelism the values inside attention and the MLP are split and the block's input, LayerNorm outputs and
# residuals are not: 24 of the 34 bytes per token per hidden unit Megatron-LM counts (Korthikanti et al. 2022, eq. 2).
ACT_SPLIT_FRACTION = 24 / 34


def activation_bytes(m: ModelConfig, layers: int, tokens: int, act_bytes: int, checkpointing: bool, head: bool, tp: int = 1) -> int:
    """Saved activations of ``layers`` blocks for ``tokens`` tokens (micro-batch x seq_len) on one of ``tp`` tensor-parallel ranks."""
    th = tokens * m.n_embd
    width, mlp = ACT_VALUES_PER_LAYER[m.arch]
    per_layer = (width + mlp * m.ffn_hidden / m.n_embd) * (1 - ACT_SPLIT_FRACTION + ACT_SPLIT_FRACTION / tp)
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


def state_bytes_per_param(precision: str, parallel: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter before sharding."""
    if precision == "fp32":
        return 4, 4, 8  # fp32 weights and grads, Adam moments
    if parallel == "zero2":
        # DeepSpeed's ZeRO-2 estimator: 16-bit weights in every rank, 18 sharded (16- and 32-bit
        # gradient partitions, fp32 master, moments); plus the fp32 accumulator our fp32 reduction
        # keeps for every parameter across micro-batches (``grad_accum``), 4 more.
        return 2, 4, 18
    if parallel == "zero3":
        # DeepSpeed's ZeRO-3 estimator charges 18 bytes in all: 16-bit weights
        # and grads, fp32 master weights and moments (12), and 2 more for its
        # fp32 gradient staging; we follow it so the two agree exactly.
        return 2, 2, 14
    # ZeRO-1 (and pipeline's ZeRO-1), BF16_Optimizer: 16-bit weights and grads and the fp32 gradient buffer whole
    # in every rank; fp32 master weights and moments sharded.
    return 2, 6, 12


def memory(cfg: PlanConfig) -> dict:
    """Bytes per GPU of ``cfg``'s layout and whether they fit."""
    m = model_config(cfg)
    facts = model_facts(m, cfg.seq_len)
    n = facts.params
    act_bytes = 4 if cfg.precision == "fp32" else 2
    w, g, o = state_bytes_per_param(cfg.precision, cfg.parallel)
    tokens_micro = cfg.micro_batch * cfg.seq_len
    largest = facts.largest_unit
    cpu_per_node = 0.0
    tp = cfg.tensor_parallel
    split = facts.tp_split  # the block matrices each tensor-parallel rank holds a 1/tp slice of
    n_rank = n - split + split / tp
    acts = functools.partial(activation_bytes, m, tokens=tokens_micro, act_bytes=act_bytes, tp=tp)
    dp = cfg.data_parallel
    if cfg.parallel == "zero3":
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
        params, grads, optim = w * n_rank, g * n_rank, o * n_rank / dp
        acts_ckpt = acts(m.n_layer, checkpointing=True, head=True)
        acts_full = acts(m.n_layer, checkpointing=False, head=True)
        stage_params = n_rank
    else:
        s = cfg.pipeline_stages
        layers = math.ceil(m.n_layer / s)
        # The first stage holds the embeddings; with one stage it holds the whole model.
        if s == 1:
            stage_params = n_rank
        else:
            sizes = facts.part_sizes  # embeddings, blocks..., final norm, head
            block = sizes[2] - split / m.n_layer + split / m.n_layer / tp
            stage_params = layers * block + sizes[0] + sizes[1]
        # ZeRO-1: weights and gradients replicated in each replica, optimizer state
        # (fp32 master weights and Adam moments in mixed precision) sharded.
        params, grads = w * stage_params, g * stage_params
        optim = o * stage_params / dp
        # 1F1B keeps up to `s` micro-batches in flight on the first stage: what each stashes (with checkpointing,
        # the blocks' inputs), s times; the recomputed block's working set and the head's, once.
        stashed = layers * tokens_micro * m.n_embd * act_bytes
        acts_ckpt = acts(layers, checkpointing=True, head=s == 1) + (s - 1) * stashed
        acts_full = acts(layers, checkpointing=False, head=s == 1) * s
    act = acts_ckpt if cfg.activation_checkpointing else acts_full
    total = params + grads + optim + act
    usable = cfg.memory_gb * GB * USABLE_FRACTION
    host_ok = cpu_per_node <= cfg.cpu_mem * GB * USABLE_FRACTION
    return {
        "parameters": n,
        "largest_layer_parameters": largest,
        "data_parallel": dp,
        "stage_parameters": int(stage_params),
        "bytes": {
            "parameters": int(params),
            "gradients": int(grads),
            "optimizer": int(optim),
            "activations": int(act),
            "activations_without_checkpointing": int(acts_full),
            "activations_with_checkpointing": int(acts_ckpt),
            "total": int(total),
            "usable": int(usable),
            "cpu_per_node": int(cpu_per_node),
        },
        "fits": total <= usable and host_ok,
        "host_fits": host_ok,
    }
