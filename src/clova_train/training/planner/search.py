"""Every layout of a cluster that divides it, each with its memory and step time, ranked; and why the others lose."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clova_train.core.errors import ClovaError
from clova_train.training.planner.config import GB, PlanConfig, model_config
from clova_train.training.planner.memory import memory
from clova_train.training.planner.steptime import step_time, train_seconds

# Equal predicted times go to the simpler layout (no gathers before gathers, no stages before stages), then to the
# larger micro-batch (the model does not follow how matmul efficiency grows with size; larger is not slower).
MODE_ORDER = ("zero1", "zero2", "zero3", "pipeline")
MICRO_BATCHES = (1, 2, 4, 8, 16)
# A layout is called communication-bound when what it cannot hide of its communication exceeds its compute.
COMM_BOUND = 1.0
# Layouts shown by `clova plan` besides the best of each family.
SHOWN = 5

LAYOUT_FIELDS = ("parallel", "tensor_parallel", "pipeline_stages", "micro_batch", "activation_checkpointing", "offload")


@dataclass
class Layout:
    """One evaluated layout: the plan with its degrees set, its memory and its step time."""

    plan: PlanConfig
    memory: dict
    time: dict

    @property
    def fits(self) -> bool:
        return self.memory["fits"]

    @property
    def seconds(self) -> float:
        return train_seconds(self.plan, self.time)

    @property
    def family(self) -> str:
        """Which kind of layout this is, for "why the others lose": mode, and whether tensor parallelism joins it."""
        return self.plan.parallel + (" + tensor parallel" if self.plan.tensor_parallel > 1 else "")

    def flags(self) -> str:
        p = self.plan
        out = f"--parallel {p.parallel}"
        out += f" --tensor-parallel {p.tensor_parallel}" if p.tensor_parallel > 1 else ""
        out += f" --pipeline-stages {p.pipeline_stages}" if p.parallel == "pipeline" else ""
        out += f" --micro-batch {p.micro_batch}"
        out += " --activation-checkpointing" if p.activation_checkpointing else ""
        out += f" --offload {p.offload}" if p.offload != "none" else ""
        return out

    def layout(self) -> dict:
        d = {k: getattr(self.plan, k) for k in LAYOUT_FIELDS}
        return {**d, "pipeline_stages": self.plan.stages, "data_parallel": self.plan.data_parallel}

    def sort_key(self) -> tuple:
        p = self.plan
        return (not self.fits, round(self.time["step_seconds"], 9), MODE_ORDER.index(p.parallel), p.tensor_parallel,
                p.stages, p.activation_checkpointing, p.offload != "none", -p.micro_batch)

    def comm_bound(self) -> bool:
        split = self.time["time_split"]
        return split["communication"] > COMM_BOUND * split["compute"]

    def summary(self) -> dict:
        """The JSON fields of a layout (documented in docs/plan.md)."""
        t = self.time
        return {
            "layout": self.layout(),
            "flags": self.flags(),
            "step_seconds": t["step_seconds"],
            "days": self.seconds / 86400,
            "tokens_per_second": t["tokens_per_second"],
            "model_tflops_per_gpu": t["model_tflops_per_gpu"],
            "hardware_tflops_per_gpu": t["hardware_tflops_per_gpu"],
            "mfu": t["mfu"],
            "memory_gb_per_gpu": self.memory["bytes"]["total"] / GB,
            "fits": self.fits,
            "time_split": dict(t["time_split"]),
            "micro_batches_per_step": t["micro_batches_per_step"],
            "pipeline_bubble": t["pipeline_bubble"],
            "communication_bound": self.comm_bound(),
        }


def evaluate(plan: PlanConfig) -> Layout:
    return Layout(plan, memory(plan), step_time(plan))


def _tensor_degrees(cfg: PlanConfig) -> list[int]:
    from clova_train.training.parallel.dims import ParallelDims
    from clova_train.training.parallel.tensor import check_tensor_parallel

    m = model_config(cfg)
    out = []
    for tp in range(1, cfg.gpus + 1):
        if cfg.gpus % tp or cfg.world % tp:
            continue
        try:
            check_tensor_parallel(m, ParallelDims(dp=1, tp=tp), cfg.gpus)
        except ClovaError:
            continue
        out.append(tp)
    return out


def candidates(cfg: PlanConfig, fixed: dict | None = None) -> list[PlanConfig]:
    """The layouts of ``cfg``'s cluster and batch, with the fields in ``fixed`` held to their values."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    unknown = set(fixed) - set(LAYOUT_FIELDS)
    if unknown:
        raise ClovaError(f"cannot hold {', '.join(sorted(unknown))} fixed; layout fields: {', '.join(LAYOUT_FIELDS)}")
    m = model_config(cfg)
    modes = [fixed["parallel"]] if "parallel" in fixed else list(MODE_ORDER)
    tps = [fixed["tensor_parallel"]] if "tensor_parallel" in fixed else _tensor_degrees(cfg)
    ckpts = [fixed["activation_checkpointing"]] if "activation_checkpointing" in fixed else [False, True]
    mbs = [fixed["micro_batch"]] if "micro_batch" in fixed else list(MICRO_BATCHES)
    out = []
    for mode in modes:
        offloads = [fixed.get("offload", "none")] if mode != "zero3" else ([fixed["offload"]] if "offload" in fixed else ["none", "cpu"])
        if mode != "zero3" and offloads != ["none"]:
            continue
        for tp in tps:
            if cfg.world % tp:
                continue
            if mode == "pipeline":
                groups = cfg.world // tp
                stages = [fixed["pipeline_stages"]] if fixed.get("pipeline_stages") else [s for s in range(2, min(groups, m.n_layer) + 1) if groups % s == 0]
            else:
                if fixed.get("pipeline_stages", 1) > 1:
                    continue
                stages = [1]
            for s in stages:
                dp = cfg.world // (tp * s)
                if cfg.world % (tp * s):
                    continue
                for mb in mbs:
                    if cfg.global_batch % (mb * dp):
                        continue
                    for ckpt in ckpts:
                        for off in offloads:
                            out.append(replace(cfg, parallel=mode, tensor_parallel=tp, pipeline_stages=s, micro_batch=mb,
                                               activation_checkpointing=ckpt, offload=off))
    return out


def rank(cfg: PlanConfig, fixed: dict | None = None) -> list[Layout]:
    """Every candidate evaluated, fastest that fits first (then those that do not fit, fastest first)."""
    return sorted((evaluate(p) for p in candidates(cfg, fixed)), key=Layout.sort_key)


def why_slower(layout: Layout, best: Layout) -> str:
    """Why ``layout`` loses to ``best``, in a few words: it does not fit, or the part of its step that grew most."""
    if not layout.fits:
        b = layout.memory["bytes"]
        return f"does not fit: {b['total'] / GB:,.1f} GB per GPU of {b['usable'] / GB:,.1f} usable"
    mine, theirs = layout.time["time_split"], best.time["time_split"]
    step = layout.time["step_seconds"]
    if layout.comm_bound():
        return f"communication-bound: {mine['communication'] / step:.0%} of the step waits on exposed communication"
    grew = {k: mine[k] - theirs[k] for k in mine}
    worst = max(grew, key=grew.get)
    if grew[worst] <= 1e-9 * layout.time["step_seconds"]:
        return "predicted as fast; ties go to the simpler layout, then the larger micro-batch"
    if worst == "bubble":
        return f"pipeline bubble: {mine['bubble'] / step:.0%} of the step idle"
    if worst == "communication":
        return f"more exposed communication: {mine['communication'] / step:.0%} of the step"
    if layout.plan.activation_checkpointing and not best.plan.activation_checkpointing:
        return "recomputes every block's forward (activation checkpointing)"
    return f"more compute per GPU ({mine['compute']:.2f} s against {theirs['compute']:.2f} s per step)"


def shown(ranked: list[Layout], n: int = SHOWN) -> list[Layout]:
    """The best ``n`` that fit, and the best of every other family (fitting or not), for the table."""
    out = [x for x in ranked if x.fits][:n]
    seen = {x.family for x in out}
    for x in ranked:
        if x.family not in seen:
            seen.add(x.family)
            out.append(x)
    return out
