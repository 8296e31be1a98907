"""Experiment trackers (W&B offline, MLflow's file store) are backends of the metrics logger: read back with
each library's own API they hold what metrics.jsonl holds, and a rerun continues the same tracker runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from clova_train.training.rundir import METRICS_FILE
from clova_train.training.trainer.loggers import TRACKERS_FILE

from conftest import clova_cli

pytestmark = pytest.mark.slow
ARGS = ["--model", "tiny", "--seq-len", "64", "--global-batch", "4", "--micro-batch", "2", "--lr", "3e-3",
        "--save-every", "4", "--eval-every", "4", "--eval-samples", "8", "--no-tensorboard"]


def wandb_history(run_dir: Path, run_id: str) -> list[dict]:
    """Every history row of the offline W&B runs with this id, in the order logged, decoded by wandb's own protobuf
    Record; the .wandb file is LevelDB's log format (32 KiB blocks of 7-byte-headed chunks) after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or kind == 0:
                pos += left
                continue
            buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):  # a full record, or the last chunk of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                if rec.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_and_mlflow_hold_the_metrics_and_a_rerun_continues_them(tmp_path, korean_shards, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for our reading here; clova train sets it for a file: URI
    from mlflow.tracking import MlflowClient

    run, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    trackers = ["--wandb", "clova-test", "--mlflow", store]
    first = clova_cli("train", *ARGS, "--data", korean_shards, "--out", run, "--steps", "4", *trackers, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    ids = json.loads((run / TRACKERS_FILE).read_text())
    second = clova_cli("train", "--out", run, "--resume", "--steps", "8", env=env)  # the trackers come from config.json
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads((run / TRACKERS_FILE).read_text()) == ids
    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))

    client = MlflowClient(store)
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("clova-train").experiment_id])] == [ids["mlflow"]]
    for key in ("loss", "lr", "grad_norm", "valid_loss", "save_seconds"):
        history = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
        assert sorted(history) == [(r["step"], r[key]) for r in logged if r.get(key) is not None], key
    params = client.get_run(ids["mlflow"]).data.params
    assert json.loads(params["train.lr"]) == 3e-3 and json.loads(params["model.n_layer"]) == json.loads((run / "config.json").read_text())["model"]["n_layer"]

    rows = wandb_history(run, ids["wandb"])
    assert len(list(run.glob(f"wandb/offline-run-*-{ids['wandb']}"))) == 2  # one per attempt, one W&B run id
    for key in ("loss", "lr", "grad_norm", "valid_loss", "save_seconds"):
        assert [(r["step"], r[key]) for r in rows if key in r] == [(r["step"], r[key]) for r in logged if r.get(key) is not None], key


def test_a_failing_tracker_is_one_warning_and_the_run_goes_on(tmp_path, korean_shards):
    run = tmp_path / "run"
    r = clova_cli("train", *ARGS, "--data", korean_shards, "--out", run, "--steps", "2", "--mlflow", "nosuchstore://x")
    assert r.returncode == 0, r.stdout + r.stderr
    warned = [line for line in r.stderr.splitlines() if "mlflow is off" in line]
    assert len(warned) == 1 and "metrics.jsonl has every metric" in warned[0], r.stderr
    assert "Traceback" not in r.stderr and len((run / METRICS_FILE).read_text().splitlines()) == 2


def test_fewshot_eval_during_zero3_training_matches_clova_eval_and_leaves_the_losses_alone(tmp_path, korean_shards, trained_run, monkeypatch):
    """The reference run (2 gloo ranks, ZeRO-3) again with --eval-task nsmc (2-shot) and --mlflow: the same losses bit
    for bit; eval/nsmc/accuracy at every evaluation, in metrics.jsonl and MLflow; step 16's equals `clova eval` on the
    export of step 16's checkpoint."""
    from conftest import TRAIN_ARGS

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    fixtures = Path(__file__).parent / "fixtures" / "eval"
    test, train = fixtures / "nsmc_test.tsv", fixtures / "nsmc_train.tsv"
    run, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    repo = Path(__file__).resolve().parents[1]
    r = clova_cli("train", *TRAIN_ARGS, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", "--keep-last", "2",
                  "--deepspeed", repo / "deepspeed_configs" / "zero3.json", "--eval-task", f"nsmc={test}:{train}",
                  "--eval-shots", "2", "--mlflow", store)
    assert r.returncode == 0, r.stdout + r.stderr
    ours = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    reference = [json.loads(line) for line in (trained_run / METRICS_FILE).read_text().splitlines()]
    for key in ("loss", "grad_norm", "lr", "samples", "valid_loss"):
        assert [x.get(key) for x in ours] == [x.get(key) for x in reference], key
    scored = {x["step"]: x["eval/nsmc/accuracy"] for x in ours if "eval/nsmc/accuracy" in x}
    assert sorted(scored) == [4, 8, 12, 16]
    ids = json.loads((run / TRACKERS_FILE).read_text())
    assert sorted((m.step, m.value) for m in MlflowClient(store).get_metric_history(ids["mlflow"], "eval/nsmc/accuracy")) == sorted(scored.items())

    hf = tmp_path / "hf"
    assert clova_cli("export", run, "--out", hf, "--dtype", "fp32", "--step", "16", "-q").returncode == 0
    e = clova_cli("eval", hf, "--task", "nsmc", "--data", test, "--train", train, "--shots", "2", "--device", "cpu",
                  "--out", tmp_path / "nsmc.json")
    assert e.returncode == 0, e.stdout + e.stderr
    offline = json.loads((tmp_path / "nsmc.json").read_text())
    assert offline["config"]["seed"] == 0 and offline["metrics"]["accuracy"] == scored[16]
    gold = [x["scores"][x["gold"]]["logprob"] for x in offline["examples"]]
    logged = [x["eval/nsmc/gold_logprob"] for x in ours if "eval/nsmc/gold_logprob" in x]
    assert len(set(logged)) == 4  # it moves as the model trains
    assert logged[-1] == pytest.approx(sum(gold) / len(gold), rel=1e-6)
