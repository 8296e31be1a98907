"""Will it fit, and how long will it take? Memory and step time for a model on a cluster, per layout.

The planner lives in :mod:`clova_train.training.planner` (``hardware``: GPU
profiles and --calibrate's measurements; ``memory``: bytes per GPU;
``steptime``: compute + exposed communication + bubble; ``search``: every
layout ranked). This module is its public face: one layout's estimate, the
cheapest fixes when it does not fit, and the tables `clova plan` and `clova
train` print.
"""

from __future__ import annotations

from dataclasses import replace

from clova_train.training.planner.config import GB, PlanConfig, model_config, model_facts
from clova_train.training.planner.hardware import PROFILES
from clova_train.training.planner.memory import USABLE_FRACTION, activation_bytes, memory
from clova_train.training.planner.search import Layout, evaluate, rank, shown, why_slower
from clova_train.training.planner.steptime import step_time, train_seconds

__all__ = [
    "GB", "deepspeed_model_states", "PROFILES", "USABLE_FRACTION", "Layout", "PlanConfig", "activation_bytes", "estimate",
    "evaluate", "format_duration", "model_config", "plan_table", "rank", "ranking_table", "shown", "suggest", "suggest_layout",
    "tensor_parallel_params", "why_slower",
]


def tensor_parallel_params(m) -> int:
    """Parameters tensor parallelism splits (the block matrices and their column biases), read off the model."""
    return model_facts(m, m.block_size).tp_split


def estimate(cfg: PlanConfig) -> dict:
    """One layout: memory per GPU, whether it fits, its step time split, and the time to train ``cfg.tokens``."""
    mem = memory(cfg)
    t = step_time(cfg)
    return {
        "config": cfg.as_dict(),
        **mem,
        "hardware": vars(cfg.hardware),
        "flops_per_token": t["flops_per_token"],
        "train_seconds": train_seconds(cfg, t),
        "micro_batches_per_step": t["micro_batches_per_step"],
        "pipeline_bubble": t["pipeline_bubble"],
        **Layout(cfg, mem, t).summary(),
    }


def suggest(cfg: PlanConfig) -> list[str]:
    """Smallest changes that make a run fit, tried in order of cost to throughput."""
    out = []
    if not cfg.activation_checkpointing and memory(replace(cfg, activation_checkpointing=True))["fits"]:
        out.append("--activation-checkpointing")
    if cfg.parallel == "zero3":
        for off in ("cpu", "nvme"):
            if off != cfg.offload and memory(replace(cfg, offload=off, activation_checkpointing=True))["fits"]:
                out.append(f"--offload {off} --activation-checkpointing")
                break
    groups = cfg.world // cfg.tensor_parallel
    for s in range(2, min(groups, model_config(cfg).n_layer) + 1):
        if groups % s:
            continue
        trial = replace(cfg, parallel="pipeline", pipeline_stages=s, offload="none", activation_checkpointing=True)
        if memory(trial)["fits"]:
            tp = f" --tensor-parallel {cfg.tensor_parallel}" if cfg.tensor_parallel > 1 else ""
            out.append(f"--parallel pipeline --pipeline-stages {s}{tp} --activation-checkpointing")
            break
    return out


def suggest_layout(cfg: PlanConfig) -> str | None:
    """The fastest layout that fits this cluster and batch, as flags with its memory and time; None if none fits."""
    ranked = rank(cfg)
    if not ranked or not ranked[0].fits:
        return None
    best = ranked[0]
    return f"{best.flags()} ({best.memory['bytes']['total'] / GB:,.1f} GB per GPU, {format_duration(best.seconds)})"


def deepspeed_model_states(cfg: PlanConfig) -> tuple[int, int]:
    """DeepSpeed's own (cpu, gpu) estimate of ZeRO-3 model states, for comparison."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    facts = model_facts(model_config(cfg), cfg.seq_len)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        facts.params, facts.largest_unit, num_gpus_per_node=cfg.gpus, num_nodes=cfg.nodes,
        cpu_offload=cfg.offload != "none", cpu_offload_params=cfg.offload != "none", zero_init=True,
    )
    return cpu, gpu


def format_duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def _split(t: dict) -> str:
    s = t["time_split"]
    return f"{s['compute']:.2f} + {s['communication']:.2f} + {s['bubble']:.2f}"


def plan_table(est: dict, fixes: list[str], *, devices: str = "GPUs", per: str = "GPU", time: bool = True):
    """One layout's plan as a rich Table: `clova plan` with a fixed layout prints it, and `clova train` before step 1.

    ``devices`` names what one rank runs on in the title and ``per`` the unit of the
    per-device rows ("rank" on CPU ranks); ``time`` adds the time rows (off when the
    device's speed is unknown).
    """
    from rich.table import Table

    c, b = est["config"], est["bytes"]
    mode = c["parallel"] + (f", {c['pipeline_stages']} stages" if c["parallel"] == "pipeline" else "")
    mode += f", tensor parallel {c['tensor_parallel']}" if c.get("tensor_parallel", 1) > 1 else ""
    mode += f", offload {c['offload']}" if c["offload"] != "none" else ""
    memory_gb = f"{c['gpu_mem']:,.1f}".removesuffix(".0")
    title = f"plan: {c['model']} on {c['nodes']} x {c['gpus']} {devices} of {memory_gb} GB ({mode}, {c['precision']})"
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
    if time:
        hw = est["hardware"]
        table.add_row("step time", f"{est['step_seconds']:,.2f} s = compute + exposed communication + bubble: {_split(est)} s"
                      + (" [yellow](communication-bound)[/]" if est["communication_bound"] else ""))
        table.add_row("throughput per GPU", f"{est['model_tflops_per_gpu']:,.1f} TFLOP/s model ({est['mfu']:.0%} MFU), "
                      f"{est['hardware_tflops_per_gpu']:,.1f} with recompute, at {hw['kernel_efficiency']:.0%} kernel efficiency of {hw['peak_tflops']:g}")
        table.add_row(f"time for {c['tokens']:.3g} tokens", format_duration(est["train_seconds"]))
    if est.get("layout_hint"):
        table.add_row("fastest layout that fits", est["layout_hint"])
    return table


def ranking_table(cfg: PlanConfig, ranked: list[Layout]):
    """The ranked layouts as a rich Table: the best first, then the runners-up and the best of each other family, each with why it loses."""
    from rich.table import Table

    hw = cfg.hardware
    memory_gb = f"{cfg.memory_gb:,.1f}".removesuffix(".0")
    title = (f"plan: {model_config(cfg).name if cfg.model != 'custom' else 'custom model'} on {cfg.nodes} x {cfg.gpus} {hw.name} "
             f"of {memory_gb} GB, global batch {cfg.global_batch} x {cfg.seq_len}, {cfg.tokens:.3g} tokens")
    table = Table(title=title)
    for col in ("#", "layout", "GB/GPU", "step s", "compute + comm + bubble", "TFLOP/s/GPU", "MFU", "time", "why not first"):
        table.add_column(col, justify="right" if col not in ("layout", "why not first") else "left")
    best = ranked[0]
    for i, x in enumerate(shown(ranked)):
        t = x.time
        why = "[green]fastest that fits[/]" if x is best and x.fits else why_slower(x, best)
        table.add_row(str(ranked.index(x) + 1), x.flags(), f"{x.memory['bytes']['total'] / GB:,.1f}", f"{t['step_seconds']:,.2f}", _split(t),
                      f"{t['hardware_tflops_per_gpu']:,.0f}", f"{t['mfu']:.0%}", format_duration(x.seconds), why)
    return table
