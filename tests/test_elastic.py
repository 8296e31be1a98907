"""Resuming on another number of ranks (issue 15): ZeRO-3 2 -> 1 -> 2 ranks, ZeRO-2 2 -> 1, pipeline 2 stages -> 1, against an uninterrupted 2-rank run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from clova_train.training.rundir import CONFIG_FILE, METRICS_FILE

from conftest import clova_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3", "--steps", "6",
        "--save-every", "2", "--eval-every", "0", "--log-every", "1", "--no-tensorboard"]
ZERO3 = ["--deepspeed", REPO / "deepspeed_configs" / "zero3.json"]
KILLED = 128 + signal.SIGKILL


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, korean_shards) -> list[dict]:
    """Six steps of ZeRO-3 on two ranks, uninterrupted."""
    run = tmp_path_factory.mktemp("elastic") / "ref"
    r = clova_cli("train", *ARGS, *ZERO3, "--data", korean_shards, "--out", run, "--nproc-per-node", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    return metrics(run)


def same_trajectory(run: Path, reference: list[dict]) -> None:
    ours = metrics(run)
    assert [x["step"] for x in ours] == list(range(1, 7))
    assert [x["samples"] for x in ours] == [x["samples"] for x in reference]  # the same global samples, step by step
    assert [x["loss"] for x in ours] == pytest.approx([x["loss"] for x in reference], rel=1e-4)
    assert [x["grad_norm"] for x in ours] == pytest.approx([x["grad_norm"] for x in reference], rel=1e-3)


def check_partial_reads(run: Path) -> None:
    """A new partition's share, read alone (what a reshard reads), equals that slice of the whole parameter, across rank files."""
    import torch

    from clova_train.export.consolidate import open_checkpoint, resolve_checkpoint

    ckpt = open_checkpoint(resolve_checkpoint(run))
    try:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            whole = dict(ckpt.tensors(key))
            for name in ("wte.weight", "ln_f.bias"):
                flat, half = whole[name].flatten(), whole[name].numel() // 2
                assert torch.equal(ckpt.read_range(name, key, half - 3, 7), flat[half - 3 : half + 4]), (name, key)
        assert ckpt.adam_step() == 6
    finally:
        ckpt.close()


def test_zero3_resumes_on_one_rank_then_on_two(tmp_path, korean_shards, reference):
    run = tmp_path / "run"
    r = clova_cli("train", *ARGS, *ZERO3, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", env={"CLOVA_FAULT": "kill_at_step=3"})
    assert r.returncode == KILLED, r.stdout + r.stderr
    r = clova_cli("train", "--out", run, "--resume", "--nproc-per-node", "1", env={"CLOVA_FAULT": "kill_at_step=5"})
    assert r.returncode == KILLED, r.stdout + r.stderr
    assert "resuming from step_00000002" in r.stderr
    assert "world size 2 -> 1, replicas 2 -> 1; micro-batch 2 per rank, accumulation 2 -> 4 steps" in r.stderr
    r = clova_cli("train", "--out", run, "--resume", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step_00000004" in r.stderr and "world size 1 -> 2" in r.stderr and "accumulation 4 -> 2 steps" in r.stderr
    same_trajectory(run, reference)
    last = run / "checkpoints" / "step_00000006"
    marker = json.loads((last / "clova_checkpoint.json").read_text())
    assert marker["layout"] == {"world_size": 2, "stages": 1, "replicas": 2} and marker["sampler"]["position"] == 48
    assert marker["files"] == {p.name: p.stat().st_size for p in last.iterdir() if p.name != "clova_checkpoint.json"}
    # Each rank's RNG lives in its own file; DeepSpeed's per-rank client state holds no one's RNG.
    assert sorted(p.name for p in last.glob("clova_rng_rank_*.json")) == ["clova_rng_rank_00000.json", "clova_rng_rank_00001.json"]
    import torch

    client = torch.load(next(last.glob("*model_states.pt")), weights_only=False)["clova"]
    assert "rng" not in client and client["world_size"] == 2
    check_partial_reads(run)
    saved = [x for x in metrics(run) if "save_seconds" in x]
    assert [x["step"] for x in saved] == [2, 4, 6] and all(x["save_bytes"] > 0 and x["save_seconds"] > 0 for x in saved)


def test_zero2_resumes_on_one_rank(tmp_path, korean_shards, reference):
    """ZeRO-1/2 keep each rank's slice of the flat fp32 masters and moments: a new world size re-cuts them."""
    run = tmp_path / "run"
    r = clova_cli("train", *ARGS, "--parallel", "zero2", "--data", korean_shards, "--out", run, "--nproc-per-node", "2",
                  env={"CLOVA_FAULT": "kill_at_step=3"})
    assert r.returncode == KILLED, r.stdout + r.stderr
    r = clova_cli("train", "--out", run, "--resume", "--nproc-per-node", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step_00000002" in r.stderr
    assert "world size 2 -> 1, replicas 2 -> 1; micro-batch 2 per rank, accumulation 2 -> 4 steps" in r.stderr
    same_trajectory(run, reference)  # ZeRO-2 and ZeRO-3 start alike and follow one curve
    assert json.loads((run / CONFIG_FILE).read_text())["deepspeed"]["zero_optimization"]["stage"] == 2
    last = run / "checkpoints" / "step_00000006"
    assert json.loads((last / "clova_checkpoint.json").read_text())["layout"] == {"world_size": 1, "stages": 1, "replicas": 1}
    assert [p.name for p in last.glob("*optim_states.pt")] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    check_partial_reads(run)


def test_pipeline_resumes_on_one_stage_and_exports(tmp_path, korean_shards, reference):
    run = tmp_path / "run"
    pipe = ["--deepspeed", REPO / "deepspeed_configs" / "pipeline_zero1.json", "--partition", "type:Block"]
    r = clova_cli("train", *ARGS, *pipe, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", env={"CLOVA_FAULT": "kill_at_step=3"})
    assert r.returncode == KILLED, r.stdout + r.stderr
    r = clova_cli("train", "--out", run, "--resume", "--nproc-per-node", "1")
    assert r.returncode == 2 and "1 ranks cannot form 2 pipeline stages evenly" in r.stdout + r.stderr
    r = clova_cli("train", "--out", run, "--resume", "--nproc-per-node", "1", "--pipeline-stages", "1", "--preempt-window", "0.001")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2 -> 1, stages 2 -> 1; micro-batch 2 per rank, accumulation 4 -> 4 steps" in r.stderr
    assert "longer than the 0 s preemption window" in r.stderr and "--signal=USR1@" in r.stderr
    check_partial_reads(run)
    same_trajectory(run, reference)  # pipeline and ZeRO-3 follow one curve (test_train), so the resharded one does too
    hf = tmp_path / "hf"
    r = clova_cli("export", run, "--out", hf, "--dtype", "fp32")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (hf / "config.json").is_file()


def test_full_disk_during_a_save_is_one_line_per_rank_and_the_next_start_cleans_up(tmp_path, korean_shards):
    run = tmp_path / "run"
    args = [a if a != "6" else "4" for a in ARGS]  # --steps 4
    r = clova_cli("train", *args, *ZERO3, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", env={"CLOVA_FAULT": "full_in_save=4"})
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out
    assert "[rank 1] " in out and "no space left on the device while saving checkpoint step_00000004" in out
    assert out.count("checkpoint step_00000002 is complete and intact, --resume continues from it") == 2  # both ranks say it
    assert not (run / "checkpoints" / "step_00000004" / "clova_checkpoint.json").exists()
    r = clova_cli("train", "--out", run, "--resume")
    assert r.returncode == 0 and "resuming from step_00000002" in r.stderr, r.stdout + r.stderr
    assert json.loads((run / "checkpoints" / "step_00000004" / "clova_checkpoint.json").read_text())["step"] == 4
