"""`clova train` for real: ZeRO-3 on two gloo processes over the konlpy shards, faults included.

The uninterrupted run (``trained_run`` in conftest) is the reference the
fault tests compare against, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clova_train.training.rundir import CONFIG_FILE, MARKER_FILE, METRICS_FILE
from clova_train.training.checkpoints.checkpoint import Checkpointer

from conftest import TRAIN_ARGS, clova_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "valid_loss", "valid_ppl", "skipped")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def compared(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in records]


def test_tiny_model_learns_korean_under_zero3_with_two_ranks(trained_run):
    recs = metrics(trained_run)
    assert [r["step"] for r in recs] == list(range(1, 17))
    assert recs[0]["loss"] == pytest.approx(math.log(2048), abs=0.1)  # uniform over the padded vocabulary
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    valid = [r["valid_loss"] for r in recs if "valid_loss" in r]
    assert len(valid) == 4 and valid[-1] < valid[0]
    assert all(r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"])) for r in recs if "valid_loss" in r)
    for r in recs:
        assert r["tokens"] == r["step"] * 8 * 64 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and not r["skipped"]
    print(f"tiny ZeRO-3, 2 gloo ranks: {sum(r['tokens_per_s'] for r in recs[2:]) / len(recs[2:]):,.0f} tokens/s")


def test_run_dir_contract(trained_run):
    cfg = json.loads((trained_run / CONFIG_FILE).read_text())
    assert set(cfg) == {"model", "train", "data", "parallel", "deepspeed", "tokenizer", "run"}
    assert cfg["model"]["name"] == "tiny" and cfg["model"]["vocab_size"] == 2048
    assert cfg["train"]["precision"] == "fp32" and cfg["train"]["steps"] == 16
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    assert cfg["deepspeed"]["zero_optimization"]["stage3_max_live_parameters"] == 1_000_000_000  # from zero3.json
    assert cfg["deepspeed"]["optimizer"]["params"]["torch_adam"] is True
    assert cfg["deepspeed"]["gradient_accumulation_steps"] == 2  # 8 = 2 ranks x micro-batch 2 x 2
    assert set(cfg["tokenizer"]) >= {"path", "hash"}
    assert cfg["run"]["world_size"] == 2 and len(cfg["run"]["config_hash"]) == 64
    # --keep-last 2: the two newest complete checkpoints, `latest` on the newest.
    ckpts = trained_run / "checkpoints"
    assert [tag for _, tag in Checkpointer.complete(ckpts)] == ["step_00000012", "step_00000016"]
    assert (ckpts / "latest").read_text().strip() == "step_00000016"
    marker = json.loads((ckpts / "step_00000016" / MARKER_FILE).read_text())
    assert marker["step"] == 16 and marker["tokens"] == 16 * 512 and marker["config_hash"] == cfg["run"]["config_hash"]
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_rerun_of_a_finished_run_has_nothing_to_do(trained_run, korean_shards):
    r = clova_cli("train", *TRAIN_ARGS, "--data", korean_shards, "--out", trained_run)
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stderr
    r = clova_cli("train", *TRAIN_ARGS, "--data", korean_shards, "--out", trained_run, "--seed", "7")
    assert r.returncode == 2 and "holds a different run (seed 1234 -> 7)" in r.stderr


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, korean_shards):
    """The reference run's command, with rank 0 killed (-9) while saving step 12."""
    run = tmp_path_factory.mktemp("killed") / "run"
    r = clova_cli(
        "train", *TRAIN_ARGS, "--data", korean_shards, "--out", run, "--nproc-per-node", "2",
        "--deepspeed", REPO / "deepspeed_configs" / "zero3.json", env={"CLOVA_FAULT": "kill_in_save=12"},
    )
    ckpts = run / "checkpoints"
    return {
        "run": run,
        "returncode": r.returncode,
        "output": r.stdout + r.stderr,
        "latest": (ckpts / "latest").read_text().strip(),
        "complete": [tag for _, tag in Checkpointer.complete(ckpts)],
        "partial": sorted(p.name for p in (ckpts / "step_00000012").iterdir()) if (ckpts / "step_00000012").is_dir() else None,
        "last_step": metrics(run)[-1]["step"],
    }


def test_kill_during_save_leaves_the_previous_checkpoint_usable(killed_run):
    assert killed_run["returncode"] == 128 + signal.SIGKILL, killed_run["output"]
    assert killed_run["last_step"] == 12
    # DeepSpeed had written step 12's files, but without the marker it does not count.
    assert killed_run["partial"] and MARKER_FILE not in killed_run["partial"]
    assert killed_run["latest"] == "step_00000008"
    assert killed_run["complete"] == ["step_00000004", "step_00000008"]


def test_resume_after_a_kill_repeats_the_uninterrupted_run_bit_for_bit(killed_run, trained_run):
    run = killed_run["run"]
    r = clova_cli("train", "--out", run, "--resume")  # config and worker count from the run dir
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step_00000008" in r.stderr
    # Steps 9-12 of the killed attempt were dropped and recomputed: same losses,
    # gradient norms and data positions (no sample skipped or seen twice).
    assert compared(metrics(run)) == compared(metrics(trained_run))
    assert [tag for _, tag in Checkpointer.complete(run / "checkpoints")][-1] == "step_00000016"


def test_sigterm_saves_and_exits_0(tmp_path, korean_shards):
    """Preemption: SIGTERM to `clova train` reaches every rank; they finish the step, save, exit 0."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", "train", "--model", "tiny", "--data", str(korean_shards),
           "--out", str(run), "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--steps", "100000",
           "--save-every", "100000", "--eval-every", "0", "--nproc-per-node", "2",
           "--deepspeed", str(REPO / "deepspeed_configs" / "zero3_offload.json")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if (run / METRICS_FILE).is_file() and len((run / METRICS_FILE).read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    last = metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {last}" in err and f"clova train --out {run} --resume" in err
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{last:08d}"
    assert json.loads((ckpts / f"step_{last:08d}" / MARKER_FILE).read_text())["step"] == last
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["parallel"]["offload"] == "cpu"  # from zero3_offload.json
    assert cfg["deepspeed"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def _srun_tasks(args: list, n: int, extra_env: dict) -> list[subprocess.CompletedProcess]:
    """`srun -n N clova train ARGS` on this machine: N processes with the variables srun gives its tasks."""
    from clova_train.training.launch import free_port

    port = str(free_port())
    procs = []
    for rank in range(n):
        env = {**os.environ, **extra_env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(n),
               "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1",
               "SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(k, None)
        cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_srun_tasks_become_ranks_and_non_finite_steps_stop_training(tmp_path, korean_shards):
    """Two Slurm tasks train together; NaN steps are skipped and counted, too many in a row stop the run."""
    run = tmp_path / "run"
    args = ["train", "--model", "tiny", "--data", korean_shards, "--out", run, "--seq-len", "64", "--global-batch", "4",
            "--micro-batch", "2", "--steps", "20", "--eval-every", "0", "--max-bad-steps", "3", "--no-tensorboard"]
    rank0, rank1 = _srun_tasks(args, 2, {"CLOVA_FAULT": "nan_at_steps=2,4,5,6"})
    assert rank0.returncode == 2 and rank1.returncode == 2, rank0.stderr + rank1.stderr
    assert "on 2 rank(s)" in rank0.stderr
    assert "step 6: 3 consecutive steps with a non-finite loss" in rank0.stderr
    assert "global samples 20..23" in rank0.stderr  # the data of step 6
    assert "non-finite" not in rank1.stderr  # an error every rank agrees on is printed once
    recs = metrics(run)
    assert [x["skipped"] for x in recs] == [False, True, False, True, True, True]
    assert recs[1]["loss"] is None and recs[1]["bad_steps"] == 1 and recs[-1]["bad_steps"] == 4
    assert math.isfinite(recs[2]["loss"])  # the skipped step left the weights usable
    assert not (run / "checkpoints" / "latest").exists()


def test_hostfile_runs_through_deepspeeds_launcher_on_blended_data(tmp_path, korean_shards, tokenizer_dir, konlpy_files):
    from clova_train.shards.format import ShardConfig
    from clova_train.shards.build import tokenize_corpus

    bills = tmp_path / "bills"  # a second shard dir: the bills alone
    tokenize_corpus(konlpy_files[1:], tokenizer_dir, bills, ShardConfig(valid_fraction=0.05, workers=1), show_progress=False)
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n")
    run = tmp_path / "run"
    r = clova_cli("train", "--model", "tiny", "--data", f"{korean_shards}:3", "--data", f"{bills}:1", "--out", run, "--seq-len", "64",
                  "--global-batch", "8", "--steps", "2", "--eval-every", "2", "--eval-samples", "8", "--no-tensorboard", "--hostfile", hosts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deepspeed.launcher.launch" in r.stdout + r.stderr
    recs = metrics(run)
    assert [x["step"] for x in recs] == [1, 2] and "valid_loss" in recs[-1]
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["data"]["weights"] == [3.0, 1.0] and len(cfg["run"]["identity"]["data"]) == 2
    state = json.loads((run / "checkpoints" / "step_00000002" / MARKER_FILE).read_text())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002" and state["tokens"] == 2 * 8 * 64
    import torch

    client = torch.load(next((run / "checkpoints" / "step_00000002").glob("*model_states.pt")), weights_only=False)["clova"]
    assert client["sampler"] == {"position": 16, "counts": [12, 4], "seq_len": 64}  # 3:1 over two global batches


def test_one_rank_follows_the_two_rank_trajectory(tmp_path, korean_shards, trained_run):
    """Same seed and global batch on 1 rank instead of 2: the same samples and init, so the same curve up to float reduction order."""
    run = tmp_path / "run"
    r = clova_cli("train", *TRAIN_ARGS, "--data", korean_shards, "--out", run, "--no-tensorboard", "--save-every", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = metrics(run), metrics(trained_run)
    assert [x["samples"] for x in one] == [x["samples"] for x in two]
    assert [x["loss"] for x in one] == pytest.approx([x["loss"] for x in two], rel=1e-4)
    assert [x["grad_norm"] for x in one] == pytest.approx([x["grad_norm"] for x in two], rel=1e-3)


def test_pipeline_mode_matches_zero3_and_resumes_after_a_kill(pipeline_run, trained_run):
    """Two stages with ZeRO-1 (deepspeed_configs/pipeline_zero1.json): same init and data as the ZeRO-3 run, so the same curve."""
    run = pipeline_run["run"]
    code, output, killed = pipeline_run["killed"]
    assert code == 128 + signal.SIGKILL, output
    killed = compared(killed)
    assert killed[-1]["step"] == 10
    r = pipeline_run["resumed"]  # a plain rerun continues from step 8
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step_00000008" in r.stderr and "2 stages x 1 replicas, partition type:Block" in r.stderr
    resumed = compared(metrics(run))
    assert resumed[:10] == killed  # steps 9 and 10 recomputed bit for bit
    reference = compared(metrics(trained_run))
    # Step 1 is the forward of identical weights on identical samples: only the order of float sums differs.
    assert resumed[0]["samples"] == reference[0]["samples"]
    assert resumed[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6)
    for key in ("loss", "grad_norm", "valid_loss"):
        ours, theirs = ([x[key] for x in recs if x[key] is not None] for recs in (resumed, reference))
        assert len(ours) == len(theirs) and ours == pytest.approx(theirs, rel=1e-4), key
    assert [x["samples"] for x in resumed] == [x["samples"] for x in reference]
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["parallel"]["mode"] == "pipeline" and cfg["parallel"]["pipeline_stages"] == 2
    assert cfg["parallel"]["partition"] == "type:Block" and cfg["run"]["identity"]["parallel"] == {"mode": "pipeline"}
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 1
    assert list((run / "checkpoints" / "step_00000016").glob("layer_*-model_states.pt"))


def test_a_run_killed_mid_batch_ramp_resumes_bit_for_bit_and_on_two_ranks(tmp_path, korean_shards):
    """--batch-rampup 4,4,768 on one rank: batches 4, 4, 4, then 8; killed after step 3 (checkpoint 2, mid-ramp), the
    rerun repeats the uninterrupted run's steps 3-8 exactly, and a copy resumed on 2 ranks (re-sharded) follows it;
    the lr holds --decay-tokens' floor."""
    args = ["train", "--model", "tiny", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3",
            "--warmup", "2", "--steps", "8", "--save-every", "2", "--eval-every", "0", "--no-tensorboard", "--log-every", "1",
            "--batch-rampup", "4,4,768", "--decay-tokens", "2048", "--data", korean_shards]
    ref = clova_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert "the batch ramps from 4 by 4 sequences over 768 tokens, full (8) from step 4" in ref.stderr
    assert "| batch 4 |" in ref.stderr and "| batch 8 |" in ref.stderr
    killed = clova_cli(*args, "--out", tmp_path / "run", env={"CLOVA_FAULT": "kill_at_step=3"})
    assert killed.returncode != 0
    shutil.copytree(tmp_path / "run", tmp_path / "elastic")
    resumed = clova_cli(*args, "--out", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from step_00000002" in resumed.stderr
    want, got = metrics(tmp_path / "ref"), metrics(tmp_path / "run")
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "batch")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
    assert [r["batch"] for r in want] == [4, 4, 4, 8, 8, 8, 8, 8]
    assert [r["samples"] for r in want] == [4, 8, 12, 20, 28, 36, 44, 52]
    floor = [r["lr"] for r in want if r["tokens"] >= 2048]
    assert len(floor) == 3 and all(lr == pytest.approx(3e-4, rel=1e-12) for lr in floor)  # min_lr = lr / 10, held

    elastic = clova_cli(*args, "--out", tmp_path / "elastic", "--nproc-per-node", "2")
    assert elastic.returncode == 0, elastic.stdout + elastic.stderr
    two = metrics(tmp_path / "elastic")
    assert [(r["step"], r["batch"], r["samples"], r["lr"]) for r in two] == [(r["step"], r["batch"], r["samples"], r["lr"]) for r in want]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in want], rel=1e-4)
