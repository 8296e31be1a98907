"""Tensor parallelism for real: `--tensor-parallel 2` against the TP=1 reference runs on gloo processes, in ZeRO-3, ZeRO-1
and pipeline mode; a kill and a resume; a change of the degree on resume; export of the joined slices.

Splitting a block across ranks changes only the order of float sums, so the curves agree with the TP=1 runs to float
precision, and a run resumed on its own layout repeats itself bit for bit.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_ARGS, clova_cli
from test_train import compared, metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def tp_args(run: Path, shards: Path, *extra) -> list:
    return ["train", *TRAIN_ARGS, "--data", shards, "--out", run, "--no-tensorboard", "--tensor-parallel", "2", *extra]


def assert_same_curve(ours: list[dict], reference: list[dict]) -> None:
    """The first 5 steps: losses within 1e-5 and grad norms within 1e-4 relative; every step: the same samples, curves within 1e-4."""
    assert [x["samples"] for x in ours] == [x["samples"] for x in reference]
    for a, b in zip(ours[:5], reference[:5]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (a, b)
    for key in ("loss", "grad_norm", "valid_loss"):
        mine, theirs = ([x[key] for x in recs if x[key] is not None] for recs in (ours, reference))
        assert len(mine) == len(theirs) and mine == pytest.approx(theirs, rel=1e-4), key


@pytest.fixture(scope="module")
def tp_zero3(tmp_path_factory, korean_shards) -> dict:
    """ZeRO-3 with 2 tensor-parallel ranks (one replica), killed (-9) after step 10 and rerun to step 16."""
    run = tmp_path_factory.mktemp("tp_zero3") / "run"
    args = tp_args(run, korean_shards, "--nproc-per-node", "2", "--deepspeed", REPO / "deepspeed_configs" / "zero3.json")
    r = clova_cli(*args, env={"CLOVA_FAULT": "kill_at_step=10"})
    killed = (r.returncode, r.stdout + r.stderr, metrics(run))
    return {"run": run, "args": args, "killed": killed, "resumed": clova_cli(*args)}


def test_tp2_zero3_matches_tp1_and_resumes_bit_for_bit_after_a_kill(tp_zero3, trained_run):
    run = tp_zero3["run"]
    code, output, killed = tp_zero3["killed"]
    assert code == 128 + signal.SIGKILL, output
    assert "tensor parallel 2 (each block split over 2 ranks)" in output and "x 1 replicas" in output
    r = tp_zero3["resumed"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step_00000008" in r.stderr and "another layout" not in r.stderr
    resumed = compared(metrics(run))
    assert resumed[:10] == compared(killed)  # steps 9 and 10 recomputed bit for bit on the same layout
    assert_same_curve(resumed, compared(metrics(trained_run)))
    marker = json.loads((run / "checkpoints" / "step_00000016" / "clova_checkpoint.json").read_text())
    assert marker["layout"]["tensor_parallel"] == 2 and marker["parallel_dims"] == {"dp": 1, "pp": 1, "tp": 2, "zero_stage": 3, "pipelined": False}
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000016").glob("*mp_rank_01*"))  # one file set per tensor-parallel rank


def test_tp2_export_equals_the_tp1_export_and_loads_in_transformers(tp_zero3, trained_run, tmp_path, tokenizer_dir, konlpy_lines):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clova_train.export.consolidate import consolidate_state_dict
    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import GPT
    from clova_train.tokenizer.bpe import ClovaTokenizer

    outs = {}
    for name, run in (("tp2", tp_zero3["run"]), ("tp1", trained_run)):
        outs[name] = tmp_path / name
        r = clova_cli("export", run, "--out", outs[name], "--dtype", "fp32", "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_file(outs["tp2"] / "model.safetensors"), load_file(outs["tp1"] / "model.safetensors")
    assert a.keys() == b.keys()
    # 16 Adam steps of float sums in another order (the same order of magnitude as a change of data-parallel size).
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(str(outs["tp2"])).eval()
    ours = GPT(ModelConfig(**json.loads((tp_zero3["run"] / "config.json").read_text())["model"])).eval()
    ours.load_state_dict(consolidate_state_dict(tp_zero3["run"]))
    ids = ClovaTokenizer.load(tokenizer_dir).encode(" ".join(konlpy_lines[:40]))
    probe = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert (hf(probe).logits - ours(probe)).abs().max().item() <= 1e-4


def test_a_tensor_parallel_change_on_resume_reshards(tp_zero3, trained_run, tmp_path):
    """TP 2 x DP 1 written, resumed at step 8 as TP 1 x DP 2: the rest of the run follows the TP=1 reference."""
    run = tmp_path / "run"
    shutil.copytree(tp_zero3["run"], run)
    args = [a if a != tp_zero3["run"] else run for a in tp_zero3["args"]]
    args[args.index("--tensor-parallel") + 1] = "1"
    for later in ("step_00000012", "step_00000016"):  # as if the TP=2 job had stopped at step 8
        shutil.rmtree(run / "checkpoints" / later)
    (run / "checkpoints" / "latest").write_text("step_00000008")
    r = clova_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tensor parallel 2 -> 1" in r.stderr and "replicas 1 -> 2" in r.stderr
    ours, reference = compared(metrics(run)), compared(metrics(trained_run))
    assert [x["step"] for x in ours] == list(range(1, 17))
    for key in ("loss", "grad_norm"):
        assert [x[key] for x in ours[8:]] == pytest.approx([x[key] for x in reference[8:]], rel=1e-4), key


def test_a_data_parallel_change_at_the_same_tensor_parallel_degree_reshards(tp_zero3, trained_run, tmp_path):
    """TP 2 x DP 1 written, resumed at step 8 as TP 2 x DP 2 on 4 ranks: each rank reads its own slices, and the run follows TP=1."""
    run = tmp_path / "run"
    shutil.copytree(tp_zero3["run"], run)
    args = [a if a != tp_zero3["run"] else run for a in tp_zero3["args"]]
    args[args.index("--nproc-per-node") + 1] = "4"
    for later in ("step_00000012", "step_00000016"):
        shutil.rmtree(run / "checkpoints" / later)
    (run / "checkpoints" / "latest").write_text("step_00000008")
    r = clova_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2 -> 4, replicas 1 -> 2" in r.stderr and "tensor parallel" not in r.stderr.split("another layout")[1].split(";")[0]
    ours, reference = compared(metrics(run)), compared(metrics(trained_run))
    for key in ("loss", "grad_norm"):
        assert [x[key] for x in ours[8:]] == pytest.approx([x[key] for x in reference[8:]], rel=1e-4), key


def test_tp2_zero1_matches_tp1(tmp_path, korean_shards, trained_run):
    run = tmp_path / "run"
    r = clova_cli(*tp_args(run, korean_shards, "--nproc-per-node", "2", "--parallel", "zero1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_curve(compared(metrics(run)), compared(metrics(trained_run)))


def test_pipeline_2_stages_x_tp2_matches_the_pipeline_run(tmp_path, korean_shards, pipeline_run):
    """4 ranks: 2 stages x 2 tensor-parallel ranks (ZeRO-1, one replica) against 2 stages x TP 1."""
    run = tmp_path / "run"
    r = clova_cli(*tp_args(run, korean_shards, "--nproc-per-node", "4", "--deepspeed", REPO / "deepspeed_configs" / "pipeline_zero1.json",
                           "--partition", "type:Block", "--pipeline-stages", "2"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 stages x 1 replicas" in r.stderr and "tensor parallel 2" in r.stderr
    assert pipeline_run["resumed"].returncode == 0
    assert_same_curve(compared(metrics(run)), compared(metrics(pipeline_run["run"])))
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000016").glob("layer_02-model_0*-model_states.pt")) == [
        "layer_02-model_00-model_states.pt", "layer_02-model_01-model_states.pt"]


def test_export_joins_the_slices_exactly(tmp_path, korean_shards):
    """The join alone: a TP=2 run whose one step moves nothing (lr 1e-30) exports the TP=1 initial weights to 1e-6.

    (After real steps the two layouts differ by what Adam makes of float-order differences; see the test above.)
    """
    from safetensors.torch import load_file

    from clova_train.model.adapter import to_hf
    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import GPT

    run, out = tmp_path / "run", tmp_path / "hf"
    args = tp_args(run, korean_shards, "--nproc-per-node", "2", "--parallel", "zero1")
    args[args.index("--steps") + 1], args[args.index("--lr") + 1] = "1", "1e-30"
    r = clova_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    r = clova_cli("export", run, "--out", out, "--dtype", "fp32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = json.loads((run / "config.json").read_text())
    model = GPT(ModelConfig(**cfg["model"]))
    model.init_weights(cfg["train"]["seed"])
    exported = load_file(out / "model.safetensors")
    ours = dict(to_hf(n, t) for n, t in model.state_dict().items())
    assert exported.keys() == ours.keys()
    assert max((exported[k] - ours[k]).abs().max().item() for k in ours) <= 1e-6
