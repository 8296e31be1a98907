"""Starting the ranks of a training run: local workers, DeepSpeed's multi-node launcher, or Slurm tasks.

Three ways in, one worker module (``clova_train.training.worker``, which this module never imports):

* ``clova train ... --nproc-per-node N``: this process checks the inputs once,
  writes RUN_DIR/launch.json and starts N local workers
  (``python -m clova_train.training.worker RUN_DIR/launch.json``) with the
  torch.distributed variables set; it forwards SIGTERM/SIGUSR1 to them and,
  when one dies, stops the others so nobody waits forever in a collective.
* ``--hostfile FILE``: the same, but DeepSpeed's launcher starts the workers
  on every host of the hostfile (pdsh over ssh); RUN_DIR must be on a shared
  filesystem, and RUN_DIR/deepspeed_env carries OMP_NUM_THREADS and the
  CLOVA_* variables to the hosts.
* Under ``srun`` (SLURM_STEP_ID set) or torchrun / the DeepSpeed launcher
  (RANK and WORLD_SIZE set), every process already is a rank: it trains
  in place, Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID becoming
  RANK / WORLD_SIZE / LOCAL_RANK, MASTER_ADDR defaulting to the first host of
  the step's node list, and rank 0 checks the inputs for everyone.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, atomic_write_text
from clova_train.training.rundir import LAUNCH_FILE

DEFAULT_PORT = 29500


@dataclass
class LaunchConfig:
    """How the ranks of a run are started (not part of the run's configuration)."""

    nproc_per_node: int | None = None
    """Local worker processes, one per GPU (None: as many as wrote the run's checkpoint, else 1)."""
    hostfile: str | None = None
    """DeepSpeed hostfile ("host slots=N" lines): start the run on all of them through DeepSpeed's launcher."""
    master_addr: str | None = None
    """Address of rank 0 (default: localhost, or the first Slurm node)."""
    master_port: int | None = None
    """Port of rank 0's rendezvous (default: a free port locally, 29500 + job id under Slurm)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ClovaError(f"--nproc-per-node must be >= 1, not {self.nproc_per_node}")


# ------------------------------------------------------------------ environments


def under_srun(env=None) -> bool:
    """srun sets SLURM_STEP_ID for its tasks; a batch script or salloc shell does not."""
    env = os.environ if env is None else env
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or env.get("CLOVA_LAUNCHER") == "slurm")


def requeue_slurm_job(env=None) -> str:
    """Put this srun's job back in the queue (``scontrol requeue``), once its checkpoint is complete; one line
    saying what happened. Slurm ends the job's steps and later reruns its batch script, which resumes."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "Not requeued (no SLURM_JOB_ID): resubmit the job"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Could not requeue job {job} ({e}): resubmit the job"
    if r.returncode != 0:
        said = ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return f"Could not requeue job {job} (scontrol: {said}): resubmit the job"
    return f"Requeued job {job}: when Slurm starts it again it resumes from the newest checkpoint"


def under_launcher(env=None) -> bool:
    """torchrun, DeepSpeed's launcher or our own workers: rank and world already set."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: "gpu[003-005,9],cpu1" -> "gpu003"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ClovaError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def first_slurm_host(env=None) -> str:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ClovaError("under srun but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; set MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True)
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this node: the list's own syntax is enough for the first host
    return expand_first_host(nodelist)


def slurm_rank_env(env=None, *, master_addr: str | None = None, master_port: int | None = None) -> dict[str, str]:
    """torch.distributed variables for one srun task."""
    env = os.environ if env is None else env
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, int(world) // nodes)),
        "MASTER_ADDR": master_addr or env.get("MASTER_ADDR") or first_slurm_host(env),
        "MASTER_PORT": str(master_port or env.get("MASTER_PORT") or DEFAULT_PORT + job % 20000),
    }


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed hostfile: "host slots=N" per line, '#' comments."""
    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: hostfile not found (see cli/hostfile.example)")
    hosts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ClovaError(f"{path}:{n}: expected 'HOST slots=N', got {line!r}")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ClovaError(f"{path}: no hosts")
    return hosts


def world_size(cfg: LaunchConfig) -> tuple[int, bool]:
    """(ranks in the run, whether this process is one of them already)."""
    if under_launcher():
        return int(os.environ["WORLD_SIZE"]), True
    if under_srun():
        if cfg.nproc_per_node not in (None, 1) or cfg.hostfile:
            raise ClovaError("under srun each task is one rank: drop --nproc-per-node/--hostfile and use srun --ntasks-per-node")
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ["SLURM_NTASKS"]), True
    if cfg.hostfile:
        return sum(slots for _, slots in read_hostfile(cfg.hostfile)), False
    return cfg.nproc_per_node or 1, False


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which Slurm and taskset narrow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads(local_ranks: int, env=None) -> int:
    """Intra-op threads of one rank, decided the same way on every launch path.

    CPU kernels split their sums by thread, so two runs are bit-identical only
    with the same threads per rank: OMP_NUM_THREADS if set, else the CPUs Slurm
    gave the task (SLURM_CPUS_PER_TASK, under srun), else this host's usable
    cores shared by its ranks.
    """
    env = os.environ if env is None else env
    cores = usable_cores()
    if under_srun(env) and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores, local_ranks = int(env["SLURM_CPUS_PER_TASK"]), 1
    given = env.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cores // max(1, local_ranks))


def pin_cpu_threads() -> int:
    """Apply :func:`cpu_threads` to this rank (torch and any OpenMP child it starts); the count."""
    import torch

    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"  # LOCAL_SIZE: DeepSpeed's launcher
    n = cpu_threads(int(local) if local.isdigit() else 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ starting ranks


def start(spec, cfg: LaunchConfig, *, module: str) -> int | None:
    """Start the ranks of a run: the exit code (0: finished or stopped cleanly, 2: a user error), or None when
    this process already is a rank (srun, torchrun), which then runs the worker itself.

    New ranks are processes running ``python -m MODULE RUN_DIR/launch.json``.
    """
    if under_launcher():
        return None
    if under_srun():
        os.environ.update(slurm_rank_env(master_addr=cfg.master_addr, master_port=cfg.master_port), CLOVA_LAUNCHER="slurm")
        return None
    spec_path = spec.run_dir / LAUNCH_FILE
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, spec.to_json())
    if cfg.hostfile:
        env = {**os.environ, "DS_ENV_FILE": str(forwarded_env_file(spec.run_dir))}
        return subprocess.call(deepspeed_command(spec_path, cfg, module), env=env)
    return spawn_local(spec_path, cfg, module)


def deepspeed_command(spec_path: Path, cfg: LaunchConfig, module: str) -> list[str]:
    """DeepSpeed's launcher starting our worker module on every host of the hostfile."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(cfg.hostfile), "--no_local_rank"]
    master = cfg.master_addr
    if len(read_hostfile(cfg.hostfile)) == 1:
        # DeepSpeed starts a one-host run locally; no ssh to check the host or to ask its address.
        cmd.append("--no_ssh_check")
        master = master or "127.0.0.1"
    if master:
        cmd += ["--master_addr", master]
    cmd += ["--master_port", str(cfg.master_port or DEFAULT_PORT)]
    return cmd + ["--module", module, str(spec_path)]


# What decides a rank's numerics and its failure handling travels to every host;
# DeepSpeed's launcher passes on only PYTHON*-style variables by itself.
FORWARDED = ("OMP_NUM_THREADS", "CLOVA_COLLECTIVE_TIMEOUT", "CLOVA_FAULT")


def forwarded_env_file(run_dir: Path) -> Path:
    """RUN_DIR/deepspeed_env: the FORWARDED variables that are set here, in DeepSpeed's KEY=VALUE format (DS_ENV_FILE)."""
    lines = [f"{k}={os.environ[k]}" for k in FORWARDED if os.environ.get(k)]
    path = run_dir / "deepspeed_env"
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def worker_env(rank: int, n: int, port: int, cfg: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR=cfg.master_addr or "127.0.0.1",
        MASTER_PORT=str(port),
        CLOVA_LAUNCHER="local",  # recorded in checkpoints: a resume may take its worker count from them
    )
    # CPU workers share the cores; without this each would start one thread per core.
    env["OMP_NUM_THREADS"] = str(cpu_threads(n, env))
    return env


def _stop_with_parent() -> None:
    """In the child: SIGTERM when this launcher dies, so orphaned workers save and exit (Linux)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: workers outlive a killed launcher


def spawn_local(spec_path: Path, cfg: LaunchConfig, module: str) -> int:
    """Start the local workers, forward stop signals, and make the others go when one fails."""
    n = cfg.nproc_per_node or 1
    port = cfg.master_port or free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(spec_path)],
            env=worker_env(r, n, port, cfg),
            preexec_fn=_stop_with_parent,
        )
        for r in range(n)
    ]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            # Peers of a dead rank block in collectives: give them a moment to report, then stop them.
            if failed_at is not None and time.monotonic() - failed_at > 5:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for p in procs]
    failures = [c for c in codes if c != 0]
    if not failures:
        return 0
    # A user error (2) says more than the kills it caused; a signal death is reported as 128 + signal.
    first = 2 if 2 in failures else failures[0]
    return 128 - first if first < 0 else first
