"""Resuming on another layout: a checkpoint's fp32 weights and Adam state, read under our names, re-sharded into this run's engine.

DeepSpeed's own loaders need the layout that saved (ZeRO-3 loads rank r's
partition into rank r; a pipeline stage loads the optimizer partition of the
same stage). A checkpoint read through :mod:`rankfiles` is layout-free: each
parameter's full fp32 master, ``exp_avg`` and ``exp_avg_sq`` under our GPT
names, and Adam's step count. A fresh engine built for the new layout takes
them partition by partition: each rank asks DeepSpeed where its share of
each parameter lies (ZeRO-3: a contiguous, padded slice; ZeRO-1/2: a
fragment of the flat partition) and reads just those elements. (DeepSpeed's
``safe_set_full_*`` would need every full tensor on every rank, and its
ZeRO-3 version cannot fill a padded last slice.) The weights the
forward pass uses (the low-precision copies) are then refreshed from the
masters, as DeepSpeed does after a load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.training.parallel.dims import ParallelDims
from clova_train.training.parallel.tensor import shard, split_of
from clova_train.training.checkpoints.rankfiles import CheckpointRef, TensorParallelCheckpoint, open_checkpoint

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout(dims: ParallelDims, partition: str) -> dict:
    """How a run is cut across its ranks: what a checkpoint records, and what resuming compares."""
    return {"world_size": dims.world, "stages": dims.pp, "replicas": dims.dp, **({"partition": partition} if dims.pipelined else {}),
            **({"tensor_parallel": dims.tp} if dims.tp > 1 else {})}


def describe_change(old: dict, new: dict, old_accum: int | None, new_accum: int, micro_batch: int) -> str:
    """The line printed before step 1 when a run resumes on another layout."""
    old, new = {"tensor_parallel": 1, **old}, {**new, "tensor_parallel": new.get("tensor_parallel", 1)}
    parts = [f"{k.replace('_', ' ')} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]
    per_rank = f"micro-batch {micro_batch} per rank, accumulation {old_accum if old_accum is not None else '?'} -> {new_accum} steps"
    return f"resuming on another layout ({', '.join(parts)}; {per_rank}); the global batch and sample order are unchanged"


def _local_params(engine, model: ModelConfig, mode: str) -> dict[str, list[torch.nn.Parameter]]:
    """Our parameter name -> this rank's parameters holding it (a tied embedding: on the first and on the last stage)."""
    names = {}
    if mode == "pipeline":
        from clova_train.training.parallel.pipeline import pipeline_names

        names = pipeline_names(model)
    out: dict[str, list] = {}
    for name, p in engine.ds.module.named_parameters():
        out.setdefault(names.get(name, name), []).append(p)
    return out


def _adam_states(opt) -> None:
    """Give every master partition its Adam state now (torch creates it at the first step), for the moments to be set into."""
    base = opt.optimizer
    # ZeRO-3 hands its masters to the optimizer only inside step(); ZeRO-1/2 keep them in its groups.
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    for p in masters:
        state = base.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 and bf16 map each parameter to its fragment of them
        opt._lazy_init_hp_params_optimizer_state()


def _set_adam_step(optimizer, step: int) -> None:
    for state in list(optimizer.state.values()):
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step


def _destination(opt, p, key: str) -> tuple[torch.Tensor | None, int]:
    """This rank's partition of parameter ``p``'s master ("fp32") or Adam ``key``, and the element of ``p`` it starts at."""
    state_key = None if key == "fp32" else key
    if hasattr(p, "ds_id"):  # ZeRO-3: a contiguous share of every parameter, the last one padded
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=state_key)
        return part, opt._get_param_partition_rank(p) * part.numel()
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: the fragment of p inside this rank's flat partition, if any
    if mapping is None:
        return None, 0
    return mapping.get_hp_fragment(state_key).view(-1), mapping.lp_fragment_address.start


def checkpoint_ref(run_dir: Path, tag: str, marker: dict, model: ModelConfig, mode: str) -> CheckpointRef:
    """Checkpoint ``tag`` of this run as the layout-free readers take it (its marker says how many stages wrote it)."""
    stages = (marker.get("layout") or {}).get("stages", 1)
    return CheckpointRef(run_dir, tag, marker, {"parallel": {"mode": mode, "pipeline_stages": stages}}, model, mode)


def check_structure(run_dir: Path, tag: str, marker: dict, model: ModelConfig, mode: str) -> None:
    """The readers' one line when the files are not laid out as DeepSpeed writes them: said before DeepSpeed meets them
    (its loader ends in a KeyError on one rank while the others wait)."""
    open_checkpoint(checkpoint_ref(run_dir, tag, marker, model, mode)).close()


@torch.no_grad()
def load_resharded(engine, run_dir: Path, tag: str, marker: dict, model: ModelConfig, mode: str) -> None:
    """Fill this rank's partitions of a freshly built engine from the checkpoint ``tag`` of another layout.

    Each rank reads only the elements its partitions hold, so a reshard reads
    the checkpoint about once in all, as a same-layout load does.
    """
    ref = checkpoint_ref(run_dir, tag, marker, model, mode)
    params = _local_params(engine, model, mode)
    tp_rank, tp = engine.dims.coords(torch.distributed.get_rank())[2], engine.dims.tp
    opt = engine.ds.optimizer
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    if zero3:
        opt.checkpoint_event_prologue()  # every parameter partitioned, none gathered
    _adam_states(opt)
    ckpt = open_checkpoint(ref)
    try:
        missing = sorted(set(params) - set(ckpt.shapes))
        if missing:
            raise ClovaError(f"{ref.path}: has no {', '.join(missing[:3])}; it was written for another model")
        # Written at this tensor-parallel degree: this rank's slice reader holds its slices, read by range as without
        # tensor parallelism. Another degree: the whole parameter is read and this rank's slice cut from it.
        source = ckpt.parts[tp_rank] if isinstance(ckpt, TensorParallelCheckpoint) and len(ckpt.parts) == tp else ckpt
        for name, held in params.items():
            shape = ckpt.shapes[name]
            cut = tp > 1 and source is ckpt and split_of(name)[0] is not None
            n = shard(name, torch.empty(shape, device="meta"), tp_rank, tp).numel() if cut else source.shapes[name].numel()
            for p in held:
                for key in ("fp32", *MOMENTS):
                    dest, start = _destination(opt, p, key)
                    if dest is None:
                        continue
                    count = max(0, min(n, start + dest.numel()) - start)
                    dest.data.zero_()  # the padding past the parameter's end
                    if cut:
                        full = ckpt.read_range(name, key, 0, shape.numel()).view(shape)
                        dest.data[:count].copy_(shard(name, full, tp_rank, tp).reshape(-1)[start : start + count])
                    else:
                        dest.data[:count].copy_(source.read_range(name, key, start, count))
        _set_adam_step(opt.optimizer, ckpt.adam_step())
    finally:
        ckpt.close()
    if zero3:
        _zero3_weights_from_masters(opt)
        opt.checkpoint_event_epilogue()
    else:
        opt.update_lp_params()  # each replica's slice of the masters into the model, then all-gathered


def _zero3_weights_from_masters(opt) -> None:
    """ZeRO-3: this rank's partition of the model weights from its fp32 masters (DeepSpeed's order after a load)."""
    for group, (fp32, lp) in enumerate(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)):
        if fp32.numel():
            lp.data.copy_(fp32.data)
        for part, q in zip(opt.fp16_partitioned_groups[group], opt.unflatten(lp, opt.fp16_partitioned_groups[group])):
            part.data = q.data
