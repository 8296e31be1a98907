"""`clova train --parallel auto` (the default): the planner picks the layout on the ranks the run has, says so in
one line, records it in config.json, and a rerun keeps the mode."""

from __future__ import annotations

import json

from conftest import TRAIN_ARGS, clova_cli

from clova_train.training.rundir import CONFIG_FILE


def _train(run, shards, ranks: int, *extra):
    r = clova_cli("train", *TRAIN_ARGS, "--data", shards, "--out", run, "--nproc-per-node", str(ranks), "--no-tensorboard",
                  "--steps", "2", "--save-every", "2", "--eval-every", "0", *extra, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_auto_on_one_rank_is_zero1_and_is_recorded(tmp_path, korean_shards):
    run = tmp_path / "run"
    r = _train(run, korean_shards, 1)  # no --parallel: auto
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["parallel"]["mode"] == "zero1" and cfg["run"]["identity"]["parallel"] == {"mode": "zero1"}
    assert cfg["parallel"]["chosen"].startswith("--parallel auto: --parallel zero1 ") and "1 cpu rank" in cfg["parallel"]["chosen"]
    said = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("--parallel auto:")]
    assert len(said) == 1


def test_auto_on_two_ranks_trains_records_and_keeps_its_mode_on_resume(tmp_path, korean_shards):
    run = tmp_path / "run"
    _train(run, korean_shards, 2, "--parallel", "auto")
    cfg = json.loads((run / CONFIG_FILE).read_text())
    mode = cfg["parallel"]["mode"]
    # A tiny model that fits every rank: data parallel with sharded optimizer state, never stages on CPU ranks unless asked.
    assert mode == "zero1" and "2 cpu ranks" in cfg["parallel"]["chosen"]
    assert cfg["run"]["identity"]["parallel"] == {"mode": mode}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # A rerun into the run dir on another rank count keeps the recorded mode, whatever the planner would pick there.
    r = clova_cli("train", "--out", run, "--resume", "--steps", "3", "--parallel", "auto", "--nproc-per-node", "1",
                  env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"--parallel auto: {mode}, the mode" in " ".join((r.stdout + r.stderr).split())
    assert json.loads((run / CONFIG_FILE).read_text())["parallel"]["mode"] == mode
