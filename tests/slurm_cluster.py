"""A real two-node Slurm cluster on localhost for the tests: munged, slurmctld and two slurmd from a generated slurm.conf.

Everything lives in one directory (key, sockets, state, spools, logs); the
daemons run in the foreground as children of the test process and are killed
by pid when the cluster closes, also when a test failed. Node names resolve
through /etc/hosts lines added for the session (rank 0's address is the first
node's name, as on a real cluster) and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel", "scontrol")
NODES = ("clova-n1", "clova-n2")
# What each node offers the scheduler (both are this machine): small, so a job asking more than a node has
# is refused as on a real cluster. Memory is not a consumable here (CR_CPU): it is checked, not reserved.
MEMORY_MB = 2048
HOSTS_TAG = "# clova-train test cluster"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, ports: list[int], cpus: int) -> str:
    ctld, slurmd, *node_ports = ports
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={p} CPUs={cpus} RealMemory={MEMORY_MB} State=UNKNOWN"
        for n, p in zip(NODES, node_ports)
    )
    # No cgroups in a container: processes are tracked by parent pid, tasks are not bound.
    return f"""\
ClusterName=clovatest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/spool-%n/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Job:
    id: str
    state: str
    exit_code: str
    info: str


@dataclass
class SlurmCluster:
    """A started cluster: ``env`` is what a user's shell would have (SLURM_CONF, PATH with `clova`)."""

    root: Path
    env: dict
    cpus_per_node: int
    procs: list = field(default_factory=list)

    def run(self, *cmd, cwd=None, check=True, timeout=60) -> subprocess.CompletedProcess:
        r = subprocess.run([str(c) for c in cmd], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}{r.stderr}\n{self.logs()}")
        return r

    def sbatch(self, *args, cwd, env: dict | None = None) -> str:
        """Submit as a user would (``sbatch ARGS``, the job inheriting this shell's environment); the job id."""
        r = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sbatch {args}: {r.stdout}{r.stderr}"
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        state = re.search(r"JobState=(\S+)", out).group(1)
        code = re.search(r"ExitCode=(\S+)", out).group(1)
        return Job(job_id, state, code, out)

    def jobs(self, job_id: str) -> list[Job]:
        """Every record of JOB (one per array task for an array job)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [Job(re.search(r"JobId=(\S+)", line).group(1), re.search(r"JobState=(\S+)", line).group(1),
                    re.search(r"ExitCode=(\S+)", line).group(1), line) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 240) -> list[Job]:
        """Wait until every record of JOB has ended; a job still running after TIMEOUT fails the test (and is cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j.state in TERMINAL for j in jobs):
                return jobs
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still running after {timeout} s:\n{self.jobs(job_id)}\n{self.logs()}")

    def task_pids(self, job_id: str, rank: int, name: str = "clova") -> list[int]:
        """Pids of the processes of JOB's task RANK whose command line mentions NAME (both nodes are this machine)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and "SLURM_STEP_ID" in env
                    and env.get("SLURM_STEP_ID") != "4294967291" and name in cmd and "slurmstepd" not in cmd):
                pids.append(int(proc.name))
        return pids

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _add_hosts() -> bool:
    """Make the node names resolve to 127.0.0.1; True when this call added the line (and must remove it)."""
    try:
        if all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES):
            return False
    except OSError:
        pass
    # In place, not by rename: in a container /etc/hosts is often a bind mount.
    with open("/etc/hosts", "a", encoding="utf-8") as f:
        f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_TAG}\n")
    return True


def _remove_hosts() -> None:
    with open("/etc/hosts", "r+", encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines(keepends=True) if HOSTS_TAG not in line]
        f.seek(0)
        f.write("".join(lines))
        f.truncate()


def _start(cmd: list, log: Path, env: dict) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what: str, ok, cluster: SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.args for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}:\n{cluster.logs()}")
        if ok():
            return
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}:\n{cluster.logs()}")


@contextlib.contextmanager
def slurm_cluster(root: Path, *, cpus_per_node: int = 1, repo: Path):
    """Start munged, slurmctld and two slurmd (CPUS_PER_NODE each) under ROOT; yield a SlurmCluster; stop them all."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged wants its socket's directory searchable by every user
    for d in ("munge", "state", "log", *(f"spool-{n}" for n in NODES)):
        (root / d).mkdir(exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, free_ports(2 + len(NODES)), cpus_per_node))
    bindir = str(Path(sys.executable).parent)  # the venv whose `clova` the jobs run
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(conf), PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo / "src"), env.get("PYTHONPATH")])))
    cluster = SlurmCluster(root, env, cpus_per_node)
    added_hosts = False
    try:
        added_hosts = _add_hosts()
        m = root / "munge"
        cluster.procs.append(_start(["munged", "-F", "--force", f"--key-file={key}", f"--socket={m}/socket",
                                     f"--pid-file={m}/munged.pid", f"--log-file={root}/log/munged.log",
                                     f"--seed-file={m}/seed"], root / "log" / "munged.out", env))
        _wait_for("munged", lambda: (m / "socket").exists(), cluster)
        cluster.procs.append(_start(["slurmctld", "-D", "-f", conf], root / "log" / "slurmctld.out", env))
        _wait_for("slurmctld", lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, cluster)
        for n in NODES:
            cluster.procs.append(_start(["slurmd", "-D", "-f", conf, "-N", n], root / "log" / f"slurmd-{n}.out", env))

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in NODES}

        _wait_for("both nodes idle in sinfo", idle, cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "--user=root", "--signal=KILL"], env=env, timeout=10, capture_output=True)
        cluster.stop()
        if added_hosts:
            _remove_hosts()
