"""`clova train --parallel auto` (the default): the planner's fastest layout that fits the devices and world size the run has.

Resolved once, in :func:`~clova_train.training.run.resolve.prepare`, before the mode is used anywhere: the
run dir's config.json then records the concrete layout (and why it was chosen), and the run identity its mode.
A run never switches modes: rerunning into a run dir takes the mode its config.json recorded. Layout fields
the user gave (``--tensor-parallel``, ``--pipeline-stages``, ``--activation-checkpointing``, ``--offload``) are
held; the micro-batch and global batch are the run's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig

AUTO = "auto"
GB = 1024**3


def local_ranks(world: int) -> int:
    """Ranks per node, as the launcher's environment says (one node holding every rank when it says nothing)."""
    from clova_train.training.parallel.distributed import local_layout

    local = local_layout(os.environ, 0, world)[1]
    return local if 0 < local and world % local == 0 else world


def this_device(local: int) -> tuple[str, str, float]:
    """(profile key, device name, GiB one rank may use): the first CUDA device, else this host's RAM shared by its ranks."""
    import torch

    from clova_train.training.planner.hardware import device_profile
    from clova_train.training.trainer.metrics import local_device_memory

    name, gb = local_device_memory(0 if torch.cuda.is_available() else None, local)
    return device_profile(name), name, gb


def recorded_mode(run_dir: Path) -> str | None:
    """The mode an existing run dir's config.json records (a run keeps its mode), or None for a new run."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        mode = json.loads(path.read_text(encoding="utf-8"))["parallel"]["mode"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ClovaError(f"{path}: not a clova run config (no parallel.mode); choose another --out") from None
    return mode if mode != AUTO else None


def choose(model: ModelConfig, train, given: dict, world: int, *, no_pipeline: bool = False, device: tuple | None = None):
    """The fastest layout that fits, as ParallelConfig fields, and the one line that says which and why.

    ``given`` holds the parallel fields the user set (flags, config file, DeepSpeed template); ``device`` is
    (profile key, name, GiB per rank), detected when None. ``no_pipeline``: the run needs what pipeline stages cannot
    give (few-shot scoring of the whole model in one rank, document masks across the stages).
    """
    from dataclasses import asdict

    from clova_train.training.parallel.ds_config import resolve_precision
    from clova_train.training.plan import PlanConfig, rank, why_slower

    local = local_ranks(world)
    gpu_type, name, memory_gb = device or this_device(local)
    cuda = gpu_type != "cpu"
    plan = PlanConfig(
        model="custom", shape=asdict(model), gpus=local, nodes=world // local, gpu_mem=memory_gb, gpu_type=gpu_type,
        seq_len=train.seq_len, micro_batch=train.micro_batch, global_batch=train.global_batch,
        precision=resolve_precision(train.precision, cuda), reduce_dtype=given.get("reduce_dtype", "fp32"),
    )
    if plan.precision == "fp32":
        plan = replace(plan, reduce_dtype="fp32")
    fixed = {k: given[k] for k in ("tensor_parallel", "activation_checkpointing") if k in given}
    fixed["offload"] = given.get("offload", "none")
    fixed["micro_batch"] = train.micro_batch
    if not cuda:
        fixed.setdefault("tensor_parallel", 1)  # CPU figures are nominal; splitting matrices only pays with NVLink
    if given.get("pipeline_stages", 0) > 1:
        fixed["pipeline_stages"] = given["pipeline_stages"]
    ranked = rank(plan, fixed)
    partitioned = given.get("partition", "parameters") != "parameters"  # --partition cuts pipeline stages

    def allowed(x) -> bool:
        if x.plan.parallel == "pipeline":
            # On CPU ranks the link figures are nominal, so the planner's bubble-versus-all-reduce trade is too:
            # stages only where asked for (a model that fits trains data-parallel, as a user of DDP expects).
            return not no_pipeline and (cuda or given.get("pipeline_stages", 0) > 1)
        return not partitioned

    ranked = [x for x in ranked if allowed(x)]
    if not cuda:
        # Nominal links make the time ranking of sharding stages meaningless on CPU ranks (measured there, ZeRO-3's
        # gathers cost a tiny model a third of its speed): the least-sharded layout that fits goes first.
        ranked.sort(key=lambda x: (not x.fits, ("zero1", "zero2", "zero3", "pipeline").index(x.plan.parallel)))
    if not ranked:
        raise ClovaError(f"--parallel auto found no layout of {world} ranks that splits the global batch {train.global_batch} into "
                         f"micro-batches of {train.micro_batch}; give --parallel, or a --global-batch that is a multiple of {train.micro_batch * world}")
    best = ranked[0]
    where = f"{world} {name} rank{'s' if world > 1 else ''}" + (f" ({local} per node)" if local != world else "")
    if not best.fits:
        why = f"nothing fits ({best.memory['bytes']['total'] / GB:.1f} GiB per rank at best)"
    else:
        runner_up = next((x for x in ranked[1:] if x.plan.parallel != best.plan.parallel), None)
        why = (f"fastest that fits of {len(ranked)} layouts, {best.time['step_seconds']:.3g} s per step predicted" if cuda
               else f"the least-sharded of {len(ranked)} layouts that fits these CPU ranks' memory")
        if runner_up is not None and cuda:
            why += f"; {runner_up.plan.parallel}: {why_slower(runner_up, best)}"
    fields = {"mode": best.plan.parallel, "tensor_parallel": best.plan.tensor_parallel,
              "pipeline_stages": best.plan.stages if best.plan.parallel == "pipeline" else 0,
              "activation_checkpointing": best.plan.activation_checkpointing, "offload": best.plan.offload}
    line = f"--parallel auto: {best.flags()} on {where} ({why})"
    return fields, line
