"""The shipped Slurm templates under a real two-node Slurm cluster on localhost (tests/slurm_cluster.py).

Each test submits cli/train.sbatch or cli/slurm_tokenize.sbatch as a user would:
the templates as shipped, set up through the environment variables they
document, and the sbatch command-line options that fit them to this cluster
(two 1-CPU nodes without GPUs). Needs Debian's slurmctld, slurmd, munge and
root; CI installs them (.ci/run) and these tests fail there rather than skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from clova_train.shards.format import open_split
from clova_train.training.checkpoints.checkpoint import Checkpointer
from clova_train.training.launch import usable_cores
from clova_train.training.rundir import MARKER_FILE, METRICS_FILE

from conftest import clova_cli
from slurm_cluster import missing_binaries, slurm_cluster
from ssh_server import missing_binaries as ssh_missing, ssh_server
from test_dedup import files, planted, split_corpus  # noqa: F401 (fixtures)
from test_train import compared, metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "cli" / "train.sbatch"
TOKENIZE_SBATCH = REPO / "cli" / "slurm_tokenize.sbatch"
DEDUP_SH = REPO / "cli" / "slurm_dedup.sbatch"
# One rank per node, each with the cores a local 2-process run gives a worker (launch.cpu_threads), so both
# runs use the same threads per rank; the template's GPUs and memory do not exist on this cluster.
CPUS = max(1, usable_cores() // 2)
FIT = ["--ntasks-per-node=1", f"--cpus-per-task={CPUS}", "--gpus-per-node=0", "--mem=0"]
# The tiny model for 24 steps (a discrepancy in threads per rank shows from step 1).
EXTRA = ["--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3", "--steps", "24",
         "--save-every", "12", "--eval-every", "6", "--eval-samples", "16", "--log-every", "6", "--no-tensorboard"]


def needs(missing: list[str], why: str, *, root: bool = False):
    """Skip outside CI when something is missing; in CI (CI=true) fail instead of hiding these tests."""
    missing = [*missing, *(["root"] if root and os.geteuid() != 0 else [])]
    if not missing:
        return
    msg = f"{why}: {', '.join(missing)} missing (see .ci/run for the apt-get line; run as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    needs(missing_binaries(), "no local Slurm cluster", root=True)  # the daemons run as SlurmUser=root
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus_per_node=CPUS, repo=REPO) as cluster:
        yield cluster


def output(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} not written)"


def submit_train(slurm, tmp: Path, run: Path, shards: Path, *, extra=EXTRA, env: dict | None = None, nodes: int = 2) -> tuple[str, Path]:
    """`MODEL=tiny DATA=... OUT=RUN EXTRA_ARGS=... sbatch --nodes=2 cli/train.sbatch` from the repo (its configs are relative)."""
    log = tmp / f"train-{run.name}-%j.out"
    job = slurm.sbatch(f"--nodes={nodes}", *FIT, f"--output={log}", TRAIN_SBATCH, cwd=REPO,
                       env={"MODEL": "tiny", "DATA": str(shards), "OUT": str(run), "EXTRA_ARGS": " ".join(extra), **(env or {})})
    return job, Path(str(log).replace("%j", job))


def wait_for_steps(run: Path, n: int, job: str, slurm, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / METRICS_FILE).is_file() and len((run / METRICS_FILE).read_text().splitlines()) >= n:
            return
        assert slurm.job(job).state in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job(job).info
        time.sleep(0.2)
    raise AssertionError(f"{run}: fewer than {n} steps after {timeout} s")


@pytest.fixture(scope="session")
def slurm_run(slurm, tmp_path_factory, korean_shards) -> Path:
    """RUN_DIR of train.sbatch on both nodes, uninterrupted: ZeRO-3 (deepspeed_configs/zero3.json), one rank per node."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    run = tmp / "run"
    job, log = submit_train(slurm, tmp, run, korean_shards)
    (j,) = slurm.wait(job)
    assert (j.state, j.exit_code) == ("COMPLETED", "0:0"), output(log) + slurm.logs()
    return run


@pytest.fixture(scope="session")
def local_run(tmp_path_factory, korean_shards) -> Path:
    """The reference: the same arguments on one machine, `clova train --nproc-per-node 2`."""
    run = tmp_path_factory.mktemp("local_train") / "run"
    r = clova_cli("train", "--model", "tiny", "--data", korean_shards, "--out", run, "--deepspeed",
                  REPO / "deepspeed_configs" / "zero3.json", *EXTRA, "--nproc-per-node", "2",
                  env={"OMP_NUM_THREADS": ""})  # the launcher's own choice, cores // 2
    assert r.returncode == 0, r.stdout + r.stderr
    return run


def test_templates_pass_shellcheck():
    needs([] if shutil.which("shellcheck") else ["shellcheck"], "cannot lint the templates")
    r = subprocess.run(["shellcheck", TRAIN_SBATCH, TOKENIZE_SBATCH, DEDUP_SH], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_array_tokenize_then_merge_equals_one_process(slurm, tmp_path, tokenizer_dir, konlpy_files):
    """`sbatch --array=0-1 cli/slurm_tokenize.sbatch`, then `clova tokenize merge`: the single-process shards, document for document."""
    corpus = " ".join(sorted({str(f.parent / "*.txt") for f in konlpy_files}))
    inputs = sorted(str(p) for pattern in corpus.split() for p in Path(pattern).parent.glob("*.txt"))
    (tmp_path / "logs").mkdir()  # the template's --output=logs/...; Slurm does not create it
    job = slurm.sbatch("--array=0-1", f"--cpus-per-task={CPUS}", "--mem=0", TOKENIZE_SBATCH, cwd=tmp_path,
                       env={"CORPUS": corpus, "TOKENIZER": str(tokenizer_dir), "OUT": str(tmp_path / "shards")})
    jobs = slurm.wait(job)
    logs = "\n".join(output(p) for p in sorted((tmp_path / "logs").glob("*")))
    assert len(jobs) == 2 and all((j.state, j.exit_code) == ("COMPLETED", "0:0") for j in jobs), logs + slurm.logs()
    nodes = [tmp_path / "shards" / f"node-{i}" for i in range(2)]
    slices = [[r["path"] for r in json.loads((d / "manifest.json").read_text())["inputs"]] for d in nodes]
    assert all(slices) and sum(slices, []) == inputs  # each task took its own contiguous slice

    merged = clova_cli("tokenize", "merge", *nodes, "--out", tmp_path / "merged", env=slurm.env)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    single = clova_cli("tokenize", *inputs, "--tokenizer", tokenizer_dir, "--out", tmp_path / "single", "--workers", "1",
                       "--on-error", "skip", "--quiet", env=slurm.env)
    assert single.returncode == 0, single.stdout + single.stderr
    for split in ("train", "valid"):
        ours = [ids.tolist() for ds in open_split(tmp_path / "merged", split) for ids in ds]
        ref = [ids.tolist() for ds in open_split(tmp_path / "single", split) for ids in ds]
        assert ours == ref and ref, split


def test_dedup_stages_run_as_slurm_array_jobs_and_equal_a_local_run(slurm, split_corpus, tmp_path):
    """`CORPUS=... OUT=... PARTITION=debug bash cli/slurm_dedup.sbatch` on a login node: datatrove submits one array
    job per stage, each depending on the one before; the last writes the manifest, and the output is the local run's."""
    paths, local = split_corpus
    out = tmp_path / "out"
    env = {**slurm.env, "CORPUS": str(paths[0].parent / "in*.jsonl"), "OUT": str(out), "PARTITION": "debug",
           "TIME_LIMIT": "00:20:00", "COLUMNS": "300"}
    r = subprocess.run(["bash", DEDUP_SH], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "sbatch refused a dedup stage" in r.stderr  # 4 GB per CPU by default; a node has 2
    assert "Memory specification can not be satisfied" in r.stderr, r.stderr  # sbatch's own reason, shown above our line
    env["EXTRA_ARGS"] = "--slurm-mem-per-cpu 1"
    r = subprocess.run(["bash", DEDUP_SH], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 7 Slurm stages" in r.stdout and "manifest.json appears when the last one ends" in r.stdout
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:  # until every job (the stats-merging ones too) has left the queue
        queued = [line for line in slurm.run("squeue", "-h", "-o", "%i %j %T %r").stdout.splitlines() if " clova-dedup-" in line]
        assert not [q for q in queued if "DependencyNeverSatisfied" in q], f"a stage failed: {queued}\n{slurm.logs()}"
        if not queued:
            break
        time.sleep(2)
    assert not queued, f"still queued after 420 s:\n{queued}\n{slurm.logs()}"
    assert (out / "manifest.json").exists()
    records = [dict(re.findall(r"(JobId|ArrayJobId|JobName|JobState|Reason)=(\S+)", line))
               for line in slurm.run("scontrol", "show", "job", "-o").stdout.splitlines() if "JobName=clova-dedup-" in line]
    refused = [r for r in records if r["Reason"] == "BadConstraints"]  # the first submission's, which asked 4 GB
    assert refused and {r["JobState"] for r in refused} == {"FAILED"}, records
    tasks: dict[str, Counter] = {}
    for r in records:
        if r not in refused:
            assert r["JobState"] == "COMPLETED", r
            tasks.setdefault(r["JobName"].removeprefix("clova-dedup-"), Counter())[r.get("ArrayJobId", r["JobId"])] += 1
    # Each array job has a task per input (per LSH band for buckets, per line-key partition for count); beside it, datatrove's stats-merging job.
    from clova_train.dedup.config import DedupConfig

    assert {stage: max(jobs.values()) for stage, jobs in tasks.items()} == {
        "read": 3, "count": 16, "signature": 3, "buckets": DedupConfig().bands, "cluster": 1, "write": 3, "finish": 1}, tasks
    # The local run's bytes (tasks are fixed by the inputs and bands, not by the machines); its manifest differs
    # only in the template's --on-error skip.
    ours, ref = files(out), files(local)
    assert {k: v for k, v in ours.items() if k != "manifest.json"} == {k: v for k, v in ref.items() if k != "manifest.json"}
    manifest = json.loads(ours["manifest.json"])
    assert manifest["config"]["on_error"] == manifest["fingerprint"]["config"]["on_error"] == "skip"
    manifest["config"]["on_error"] = manifest["fingerprint"]["config"]["on_error"] = "raise"
    assert manifest == json.loads(ref["manifest.json"])
    assert sorted(p.name for p in (out / ".work").iterdir()) == ["logs", "slurm_logs"]  # the logs stay for the user

    # Running the line again submits nothing: every stage is complete.
    r = subprocess.run(["bash", DEDUP_SH], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout + r.stderr


def test_train_sbatch_on_two_nodes_equals_a_local_two_process_run(slurm_run, local_run):
    """Same arguments, same ranks, same threads per rank (--cpus-per-task = cores // 2): the same metrics.jsonl, bit for bit."""
    marker = json.loads((slurm_run / "checkpoints" / "step_00000024" / MARKER_FILE).read_text())
    assert marker["launcher"] == "slurm" and marker["world_size"] == 2
    two_nodes, here = metrics(slurm_run), metrics(local_run)
    assert [x["step"] for x in two_nodes] == list(range(1, 25))
    assert compared(two_nodes) == compared(here)


def test_usr1_preemption_checkpoints_once_and_the_job_requeues_itself_to_finish_the_same_run(slurm, slurm_run, tmp_path, korean_shards):
    """scancel --signal=USR1 mid-run (what --signal=USR1@120 sends): one checkpoint, rank 0 requeues the job, and the
    job, started again by Slurm under the same id, resumes and ends with the uninterrupted run's metrics."""
    run = tmp_path / "run"
    job, log = submit_train(slurm, tmp_path, run, korean_shards)
    wait_for_steps(run, 3, job, slurm)
    slurm.run("scancel", "--signal=USR1", job)
    (j,) = slurm.wait(job, timeout=420)
    text = output(log)  # both runs of the job: the template appends (--open-mode=append)
    assert (j.state, j.exit_code) == ("COMPLETED", "0:0"), text + slurm.logs()
    assert "Restarts=1" in j.info, j.info  # Slurm ran the job twice, resubmitted by nobody
    stopped_at = int(re.search(r"stopped by SIGUSR1 after step (\d+)", text).group(1))
    assert stopped_at < 24 and f"checkpoint step_{stopped_at:08d} is complete. Requeued job {job}" in text, text
    assert f"resuming from step_{stopped_at:08d}" in text
    # The preemption's checkpoint beside the periodic ones (--save-every 12), whenever the signal landed.
    assert [tag for _, tag in Checkpointer.complete(run / "checkpoints")] == [f"step_{s:08d}" for s in sorted({stopped_at, 12, 24})]
    assert compared(metrics(run)) == compared(metrics(slurm_run))


def test_scancel_checkpoints_once_and_resubmission_finishes_the_same_run(slurm, slurm_run, tmp_path, korean_shards):
    """scancel (SIGTERM): one checkpoint, exit 0, no requeue (the user stopped it); the same sbatch line resumes."""
    run = tmp_path / "run"
    job, log = submit_train(slurm, tmp_path, run, korean_shards)
    wait_for_steps(run, 3, job, slurm)
    slurm.run("scancel", "--signal=TERM", job)
    (j,) = slurm.wait(job)
    text = output(log)
    assert (j.state, j.exit_code) == ("COMPLETED", "0:0") and "Restarts=0" in j.info, text + slurm.logs()
    stopped_at = metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {stopped_at}" in text and "resubmit the job" in text, text
    periodic = {12} if stopped_at >= 12 else set()  # --save-every 12, if the signal came that late
    assert [tag for _, tag in Checkpointer.complete(run / "checkpoints")] == [f"step_{s:08d}" for s in sorted({stopped_at} | periodic)]

    job2, log2 = submit_train(slurm, tmp_path, run, korean_shards)
    (j2,) = slurm.wait(job2)
    assert (j2.state, j2.exit_code) == ("COMPLETED", "0:0"), output(log2) + slurm.logs()
    assert f"resuming from step_{stopped_at:08d}" in output(log2)
    assert compared(metrics(run)) == compared(metrics(slurm_run))


def test_a_node_that_stops_answering_fails_the_job_with_a_clear_message(slurm, tmp_path, korean_shards):
    """Rank 1's node hangs (SIGSTOP: its sockets stay open, nothing answers): rank 0 gives up after
    CLOVA_COLLECTIVE_TIMEOUT, not after the default 30 minutes, and says so; the checkpoint before stays complete.

    Resubmitted on the one node left, the run resumes from that checkpoint, re-sharded for one rank.
    """
    run = tmp_path / "run"
    extra = [*EXTRA[:EXTRA.index("--steps")], "--steps", "1000", "--save-every", "4", "--eval-every", "0", "--no-tensorboard"]
    job, log = submit_train(slurm, tmp_path, run, korean_shards, extra=extra, env={"CLOVA_COLLECTIVE_TIMEOUT": "20"})
    wait_for_steps(run, 6, job, slurm)
    pids = slurm.task_pids(job, rank=1, name="clova")
    assert pids, slurm.job(job).info
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    jobs = slurm.wait(job, timeout=240)  # bounded by the 20 s timeout and srun --kill-on-bad-exit, far below 1800 s
    text = output(log)
    assert jobs[0].state == "FAILED", text + slurm.logs()
    # Rank 0 waits in a training step's collective, or in a checkpoint save's when the hang lands there.
    line = re.search(r"lost contact with another rank( while saving)? \(Timed out waiting 20000ms.*", text)
    assert line and "collective timeout 20 s" in line.group(0), text
    assert "Traceback" not in text, text
    complete = Checkpointer.complete(run / "checkpoints")
    step, tag = complete[-1]
    assert step >= 4 and step % 4 == 0, text
    assert (f"the last complete checkpoint is {tag}, and resubmitting the job continues from it" in line.group(0)
            or f"checkpoint {tag} is complete and intact" in line.group(0)), text
    assert (run / "checkpoints" / "latest").read_text().strip() == tag
    # Complete means every rank's shards are there and load (the weights and optimizer state of both ranks).
    import torch

    files = sorted((run / "checkpoints" / tag).glob("*.pt"))
    assert {p.name for p in files} >= {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    for p in files:
        assert torch.load(p, map_location="cpu", weights_only=False)

    # Resubmitted on the one node left: the checkpoint is re-sharded for one rank and the run goes on
    # (two more steps, so the test stays short).
    extra2 = [*extra[:extra.index("--steps")], "--steps", str(step + 2), *extra[extra.index("--steps") + 2:]]
    job2, log2 = submit_train(slurm, tmp_path, run, korean_shards, extra=extra2, nodes=1)
    (j2,) = slurm.wait(job2)
    text2 = output(log2)
    assert (j2.state, j2.exit_code) == ("COMPLETED", "0:0"), text2 + slurm.logs()
    assert f"resuming from {tag}" in text2 and "world size 2 -> 1" in text2, text2
    assert Checkpointer.complete(run / "checkpoints")[-1][0] == step + 2


# ------------------------------------------------------------------ --hostfile through ssh


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    needs(ssh_missing(), "no local ssh server", root=True)  # sshd, and root login by key
    with ssh_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def test_hostfile_trains_through_ssh_and_pdsh_like_a_local_run(sshd, local_run, tmp_path, korean_shards):
    """`clova train --hostfile` with two hosts that are both this machine (localhost, 127.0.0.1): DeepSpeed's launcher
    checks ssh, asks the first host its address (`hostname -I`, no --master-addr) and starts one rank per host
    through pdsh over ssh. OMP_NUM_THREADS travels to the hosts (RUN_DIR/deepspeed_env), so the two
    ranks run with the local run's threads and reproduce its metrics bit for bit.
    """
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run = tmp_path / "run"
    env = {"PATH": f"{sshd.bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": str(CPUS)}
    r = clova_cli("train", "--model", "tiny", "--data", korean_shards, "--out", run, "--deepspeed",
                  REPO / "deepspeed_configs" / "zero3.json", *EXTRA, "--hostfile", hosts, env=env, cwd=REPO)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert "pdsh -S -f 1024 -w localhost,127.0.0.1" in text and "--node_rank=%n" in text, text
    assert (run / "deepspeed_env").read_text() == f"OMP_NUM_THREADS={CPUS}\n"
    logins = (sshd.root / "sshd.log").read_text()
    assert logins.count("Accepted publickey for root") >= 3, logins  # the check, the address, one per host
    assert compared(metrics(run)) == compared(metrics(local_run))


# ------------------------------------------------------------------ the pieces, without daemons


def test_threads_per_rank_are_decided_one_way_on_every_launch_path():
    from clova_train.training.launch import cpu_threads

    cores = usable_cores()
    assert cpu_threads(2, {}) == max(1, cores // 2)  # local workers share the host
    assert cpu_threads(2, {"OMP_NUM_THREADS": "3"}) == 3  # the user's choice wins everywhere
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    assert cpu_threads(8, {**srun, "SLURM_CPUS_PER_TASK": "5"}) == 5  # what Slurm gave the task
    assert cpu_threads(1, {**srun}) == cores  # no --cpus-per-task: the cores, as for one rank on the host
    # A batch script that runs `clova train --nproc-per-node` itself is not a task of srun: its workers share the cores.
    assert cpu_threads(2, {"SLURM_CPUS_PER_TASK": "5"}) == max(1, cores // 2)


def test_collective_timeout_and_the_lost_peer_line(tmp_path, monkeypatch):
    from datetime import timedelta

    from clova_train.core.errors import ClovaError
    from clova_train.training.parallel.distributed import collective_timeout
    from clova_train.training.worker import lost_peer_message

    assert collective_timeout({}) == timedelta(minutes=30)
    assert collective_timeout({"CLOVA_COLLECTIVE_TIMEOUT": "20"}) == timedelta(seconds=20)
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ClovaError, match="CLOVA_COLLECTIVE_TIMEOUT"):
            collective_timeout({"CLOVA_COLLECTIVE_TIMEOUT": bad})
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:22446: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging or bugs in the application.")
    line = lost_peer_message(gloo, tmp_path)
    assert line.startswith("lost contact with another rank (Read error [127.0.0.1]:22446: Connection reset by peer)")
    assert "there is no complete checkpoint yet" in line and "pair.cc" not in line
    (tmp_path / "checkpoints" / "step_00000008").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000008" / MARKER_FILE).write_text(json.dumps({"tag": "step_00000008", "step": 8}))
    assert "the last complete checkpoint is step_00000008" in lost_peer_message(gloo, tmp_path)
    assert lost_peer_message(RuntimeError("shape mismatch"), tmp_path) is None  # a bug stays a traceback

    # The same loss inside a checkpoint save: the save's line says it, not "its line says why" (a hung rank says nothing).
    from clova_train.training.checkpoints.checkpoint import Checkpointer, PeerLost

    monkeypatch.delenv("CLOVA_COLLECTIVE_TIMEOUT", raising=False)
    ckpt = Checkpointer(tmp_path, None, rank=0, world=2, keep_last=3)
    with pytest.raises(PeerLost) as e, ckpt._failures("step_00000012"):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete")
    assert str(e.value) == ("checkpoint step_00000012 not saved: lost contact with another rank while saving (Timed out waiting 20000ms for "
                            "recv operation to complete): a node died, hung or left the network (collective timeout 1800 s, "
                            "CLOVA_COLLECTIVE_TIMEOUT); checkpoint step_00000008 is complete and intact, --resume continues from it")
    with pytest.raises(PeerLost, match="another rank stopped while saving \\(its line says why\\)"), ckpt._failures("step_00000012"):
        raise RuntimeError("[/src/gloo/transport/tcp/pair.cc:589] Read error: unexpected message type")


def test_requeue_is_the_flag_else_the_template_s_variable(monkeypatch):
    from clova_train.training.run.config import TrainConfig
    from clova_train.training.launch import requeue_slurm_job
    from clova_train.training.trainer.loop import requeue_wanted

    monkeypatch.delenv("CLOVA_REQUEUE", raising=False)
    assert not requeue_wanted(TrainConfig())  # a plain `srun clova train` stops and stays stopped
    monkeypatch.setenv("CLOVA_REQUEUE", "1")  # cli/train.sbatch
    assert requeue_wanted(TrainConfig()) and not requeue_wanted(TrainConfig(requeue=False))
    assert requeue_slurm_job({}) == "Not requeued (no SLURM_JOB_ID): resubmit the job"
