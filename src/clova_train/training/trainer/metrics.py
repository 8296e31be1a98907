"""What a run reports: the metrics logger (its backends in loggers.py), loss.png, the live progress line, throughput and memory."""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from pathlib import Path

import torch

from clova_train.core.files import commit_file, tmp_name
from clova_train.training.rundir import METRICS_FILE, PLOT_FILE
from clova_train.training.trainer.loggers import JsonlBackend, MetricsBackend, TensorBoardBackend


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class MetricsLogger:
    """The run's metrics on rank 0: kept in memory for loss.png, handed to every backend (metrics.jsonl, TensorBoard)."""

    def __init__(self, run_dir: Path, *, enabled: bool, monitor=None, backends: list[MetricsBackend] | None = None):
        self.plot_path = run_dir / PLOT_FILE
        self.enabled = enabled
        self.records: list[dict] = []
        self.backends: list[MetricsBackend] = [JsonlBackend(run_dir / METRICS_FILE)]
        if monitor is not None and getattr(monitor, "enabled", False):
            self.backends.append(TensorBoardBackend(monitor))
        self.backends += backends or []

    def resume_at(self, step: int) -> None:
        """Keep what steps 1..step logged; later lines belong to the interrupted attempt."""
        if not self.enabled:
            return
        for backend in self.backends:
            kept = backend.resume_at(step)
            if isinstance(backend, JsonlBackend):
                self.records = kept

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(clean)
        for backend in self.backends:
            backend.log(clean)

    def amend(self, fields: dict) -> None:
        """Add ``fields`` to the last step's record (a save's cost, known only after the step was logged)."""
        if not self.enabled or not self.records:
            return
        self.records[-1].update(fields)
        for backend in self.backends:
            backend.amend(self.records[-1])

    def plot(self) -> None:
        """Redraw loss.png in the background: the other ranks would otherwise wait for matplotlib."""
        if self.enabled and self.records:
            self._join_plotter()
            self._plotter = threading.Thread(target=plot_losses, args=(list(self.records), self.plot_path), daemon=True)
            self._plotter.start()

    def _join_plotter(self) -> None:
        if getattr(self, "_plotter", None) is not None:
            self._plotter.join()
            self._plotter = None

    def close(self) -> None:
        self._join_plotter()
        if self.enabled:
            for backend in self.backends:
                backend.close()


def loss_figure(records: list[dict], title: str):
    """Train and valid loss against tokens seen, the learning rate on a second axis (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    valid = [(r["tokens"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    lr = [(r["tokens"], r["lr"]) for r in records if r.get("lr") is not None]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines = ax.get_lines()
    if lr:  # warm-up and decay explain most bends of the loss curve
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr), "--", color="0.5", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lines += ax_lr.get_lines()
    ax.legend(lines, [line.get_label() for line in lines])
    last = records[-1]
    ax.set_title(f"{title}: step {last.get('step', '?'):,}, {last.get('tokens', 0):,} tokens")
    fig.tight_layout()
    return fig


def plot_losses(records: list[dict], path: Path) -> None:
    """loss.png of the run in ``path``'s dir (titled with its name), written atomically."""
    fig = loss_figure(records, Path(path).resolve().parent.name)
    tmp = tmp_name(path, ".png")  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=100)
    commit_file(tmp, path)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Dense bf16 peak of one device, from the planner's GPU profiles, or the override; None for a CPU or an unknown GPU."""
    if override:
        return override
    from clova_train.training.planner.hardware import PROFILES, device_profile

    key = device_profile(device_name, unknown=None)
    return PROFILES[key].peak_tflops if key not in (None, "cpu") else None


def device_memory(dist) -> tuple[str, float]:
    """(device name, GiB a rank may use) of this rank: see :func:`local_device_memory`."""
    return local_device_memory(dist.device if dist.is_cuda else None, dist.local_world)  # local_rank % device_count, not local_rank


def local_device_memory(cuda_device, ranks_per_node: int) -> tuple[str, float]:
    """(device name, GiB a rank may use): ``cuda_device``'s memory, or with None this node's RAM shared by its ranks ("cpu")."""
    if cuda_device is not None:
        props = torch.cuda.get_device_properties(cuda_device)
        return props.name, props.total_memory / 1024**3
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return "cpu", ram / max(1, ranks_per_node)


def memory_in_use(cuda: bool) -> float:
    """GiB: peak allocated on the GPU, or this process's peak RSS."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class ProgressLine:
    """Rank 0's live line: step, loss, lr, grad norm, tokens/s, TFLOP/s and MFU per device, memory, ETA."""

    def __init__(self, *, enabled: bool, total_steps: int, log_every: int):
        from clova_train.core.progress import console

        self.console = console
        self.enabled = enabled
        self.total = total_steps
        self.log_every = log_every
        self.live = None
        self.times: deque[float] = deque(maxlen=20)

    def __enter__(self) -> "ProgressLine":
        if self.enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def format(self, r: dict) -> str:
        eta = self.eta(r["step"])
        parts = [
            f"step {r['step']}/{self.total}",
            f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss nan (skipped)",
            f"lr {r['lr']:.2e}",
            *([f"batch {r['batch']}"] if r.get("batch") is not None else []),  # only while --batch-rampup applies
            f"grad {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad nan",
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"{r['tflops_per_device']:.3g} TFLOP/s/dev",
        ]
        if r.get("mfu") is not None:
            parts.append(f"MFU {r['mfu']:.1%}")
        parts.append(f"mem {r['memory_gb']:.1f} GiB")
        if r.get("valid_loss") is not None:
            parts.append(f"valid {r['valid_loss']:.4f} (ppl {r['valid_ppl']:.1f})")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def eta(self, step: int) -> str:
        recent = self.times
        if not recent:
            return "?"
        s = int(sum(recent) / len(recent) * (self.total - step))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def update(self, record: dict, step_seconds: float) -> None:
        self.times.append(step_seconds)
        if not self.enabled:
            return
        line = self.format(record)
        if self.live is not None:
            self.live.update(line)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total or "valid_loss" in record:
            self.console.print(line, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ one rank
