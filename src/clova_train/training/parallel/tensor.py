"""Tensor parallelism, Megatron's way, on DeepSpeed's own layers: each block's matrices split across the ranks of a node.

The fused QKV (gpt3; llama's separate q, k and v) and the first MLP matrix
(llama: gate and up) are split by columns (whole heads per rank, key/value
heads too; DeepSpeed's ``LinearLayer``: identity forward, all-reduce of the
input gradient), the attention output and the last MLP matrix by rows
(``LinearAllreduce``: all-reduce of the output); one all-reduce each way per
sub-layer. Embeddings, norms and the head stay whole on every rank. The
weights are initialised whole from the seed and then sliced, so a run with
``--tensor-parallel N`` starts from the weights of the same run with 1.

:data:`TP_PLAN` is the one description of the split: the engines apply it and
the checkpoint readers undo it.
"""

from __future__ import annotations

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.training.parallel.dims import ParallelDims

# Suffix of a block's Linear -> how it is split: "qkv" (columns, q, k and v each by heads), "column", "row".
# Both archs' blocks: a suffix a block lacks is skipped.
TP_PLAN = {
    "attn.qkv": "qkv", "attn.q": "column", "attn.k": "column", "attn.v": "column", "attn.proj": "row",
    "mlp.fc": "column", "mlp.gate": "column", "mlp.up": "column", "mlp.proj": "row",
}


def split_of(name: str) -> tuple[str | None, int | None]:
    """How our parameter ``name`` is split across tensor-parallel ranks: (kind, dim); (None, None) when every rank holds it whole."""
    for suffix, kind in TP_PLAN.items():
        for leaf, dim in (("weight", 0 if kind != "row" else 1), ("bias", 0)):
            if f".{name}".endswith(f".{suffix}.{leaf}"):
                if kind == "row" and leaf == "bias":
                    return None, None  # added after the all-reduce: whole on every rank
                return kind, dim
    return None, None


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of our whole parameter ``name`` (the tensor itself when it is not split)."""
    kind, dim = split_of(name)
    if kind is None or size == 1:
        return full
    if kind == "qkv":
        return torch.cat([part.chunk(size, dim=0)[rank] for part in full.chunk(3, dim=0)], dim=0)
    return full.chunk(size, dim=dim)[rank]


def unshard(name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """Our whole parameter from every tensor-parallel rank's slice, in rank order (inverse of :func:`shard`)."""
    kind, dim = split_of(name)
    if kind is None or len(slices) == 1:
        return slices[0]
    if kind == "qkv":
        per_rank = [s.chunk(3, dim=0) for s in slices]  # each rank: [q_r; k_r; v_r]
        return torch.cat([torch.cat([r[i] for r in per_rank], dim=0) for i in range(3)], dim=0)
    return torch.cat(slices, dim=dim)


def check_tensor_parallel(model: ModelConfig, dims: ParallelDims, ranks_per_node: int | None) -> None:
    """Refuse, before step 1, a degree the model's heads and MLP width do not divide, or a group that would span nodes."""
    tp = dims.tp
    if tp == 1:
        return
    if model.n_head % tp:
        raise ClovaError(f"--tensor-parallel {tp}: the model's {model.n_head} attention heads do not divide into {tp} ranks; use a degree that divides {model.n_head}")
    if model.n_kv_head % tp:
        raise ClovaError(f"--tensor-parallel {tp}: the model's {model.n_kv_head} key/value heads do not divide into {tp} ranks; "
                         f"use a degree that divides {model.n_kv_head} (or more --n-kv-head)")
    if model.ffn_hidden % tp:
        raise ClovaError(f"--tensor-parallel {tp}: the MLP width {model.ffn_hidden} does not divide into {tp} ranks")
    if ranks_per_node is not None and ranks_per_node % tp:
        raise ClovaError(
            f"--tensor-parallel {tp} with {ranks_per_node} rank(s) per node would put a tensor-parallel group across nodes "
            f"(its all-reduces need NVLink, not the network); use a degree that divides {ranks_per_node}"
        )


def parallelize_blocks(blocks, group) -> None:
    """Replace each block's Linear layers by DeepSpeed's tensor-parallel ones on ``group``, keeping this rank's slice."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode

    set_autotp_mode(training=True)

    class QKVColumnParallel(LinearLayer):
        """The fused QKV split by whole heads: this rank keeps rows [q_r; k_r; v_r], so the block's chunk(3) gives its heads."""

        def uneven_partition(self, params_list):
            for p in params_list:
                if p is not None:
                    p.data = self.move(shard("attn.qkv.weight", p.data, self.tp_index, self.tp_world_size)).detach()

    layers = {"qkv": QKVColumnParallel, "column": LinearLayer, "row": LinearAllreduce}
    for block in blocks:
        for suffix, kind in TP_PLAN.items():
            owner_name, _, attr = suffix.rpartition(".")
            owner = block.get_submodule(owner_name)
            linear = getattr(owner, attr, None)
            if not isinstance(linear, torch.nn.Linear):
                continue  # a stage's non-block layer, or already split
            setattr(owner, attr, layers[kind](linear, group))


class TensorParallelGroups:
    """The model-parallel unit DeepSpeed asks about its groups (``deepspeed.initialize(mpu=...)``), from the run's layout.

    ZeRO then shards and reduces over the data-parallel group only, and the
    gradient norm sums split matrices over the tensor-parallel group while
    counting whole parameters once.
    """

    def __init__(self, dims: ParallelDims, rank: int, groups: dict):
        self.dims, self.rank, self.groups = dims, rank, groups
        self.pp_rank, self.dp_rank, self.tp_rank = dims.coords(rank)

    def get_model_parallel_group(self):
        return self.groups["tp"]

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    def get_data_parallel_group(self):
        return self.groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return next(g for g in self.dims.group_ranks("dp") if self.rank in g)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp
