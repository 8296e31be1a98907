"""`clova plan`: memory against DeepSpeed's estimator and against what autograd really saves."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.model.gpt import GPT, num_params
from clova_train.model.config import ModelConfig
from clova_train.training.plan import GB, PlanConfig, activation_bytes, deepspeed_model_states, estimate, suggest

runner = CliRunner()


def _states(est: dict) -> int:
    b = est["bytes"]
    return b["parameters"] + b["gradients"] + b["optimizer"]


@pytest.mark.parametrize(
    "cfg",
    [
        PlanConfig(model="1.3b", gpus=8, gpu_mem=80),
        PlanConfig(model="13b", gpus=8, nodes=4, gpu_mem=40),
        PlanConfig(model="82b", gpus=8, nodes=2, gpu_mem=80, offload="cpu"),
    ],
    ids=lambda c: f"{c.model}-{c.nodes}x{c.gpus}-{c.offload}",
)
def test_model_states_agree_with_deepspeed(cfg):
    cpu, gpu = deepspeed_model_states(cfg)
    est = estimate(cfg)
    assert _states(est) == gpu
    if cfg.offload != "none":
        assert est["bytes"]["cpu_per_node"] == pytest.approx(cpu, rel=1e-9)


def test_zero2_states_are_deepspeeds_estimate_plus_the_fp32_accumulator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = PlanConfig(model="1.3b", gpus=8, gpu_mem=80, parallel="zero2")
    n = estimate(cfg)["parameters"]
    _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert _states(estimate(cfg)) == pytest.approx(gpu + 4 * n, abs=8)
    zero1 = estimate(PlanConfig(model="1.3b", gpus=8, gpu_mem=80, parallel="zero1"))
    zero3 = estimate(PlanConfig(model="1.3b", gpus=8, gpu_mem=80))
    assert _states(zero3) < _states(estimate(cfg)) < _states(zero1)  # more sharding, less memory


def test_pipeline_bubble_and_micro_batches_enter_the_time():
    # 82B on 16 stages x 64 replicas, global batch 1,024 of micro-batch 1: 16 micro-batches per step, and 15 slots of
    # one micro-batch's work idle in each stage (1F1B).
    cfg = PlanConfig(model="82b", gpus=8, nodes=128, parallel="pipeline", pipeline_stages=16, global_batch=1024)
    est = estimate(cfg)
    split = est["time_split"]
    assert est["micro_batches_per_step"] == 16
    # Each idle slot is one micro-batch's compute plus its tensor-parallel and stage-boundary traffic (not the step's
    # gradient reduction, which happens once).
    assert 15 * split["compute"] / 16 < split["bubble"] < 15 * (split["compute"] + split["communication"]) / 16
    assert est["pipeline_bubble"] == pytest.approx(split["bubble"] / est["step_seconds"])
    bigger = estimate(dataclasses.replace(cfg, global_batch=4096))  # 4x the micro-batches: the same 15 idle slots, in a longer step
    assert bigger["micro_batches_per_step"] == 64 and bigger["time_split"]["bubble"] == pytest.approx(split["bubble"])
    assert bigger["pipeline_bubble"] < est["pipeline_bubble"] / 2
    r = CliRunner().invoke(app, ["plan", "--model", "82b", "--gpus", "8", "--nodes", "128", "--parallel", "pipeline", "--pipeline-stages", "16"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "pipeline bubble" in r.output and "(1F1B, 16 stages, 16 micro-batches per step)" in r.output
    assert "fastest layout that fits" in r.output and "compute + exposed communication + bubble" in r.output


def test_layout_suggestion_for_the_big_presets():
    from clova_train.training.plan import suggest_layout

    small = suggest_layout(PlanConfig(model="1.3b", gpus=8, gpu_mem=80))
    assert small.startswith(("--parallel zero1 ", "--parallel zero2 "))  # fits whole on each GPU: no gathers
    for model, nodes in (("39b", 8), ("82b", 16)):
        layout = suggest_layout(PlanConfig(model=model, gpus=8, gpu_mem=40, nodes=nodes))
        assert layout is not None and "GB per GPU" in layout


def test_82b_does_not_fit_eight_80gb_gpus_with_zero3_alone():
    est = estimate(PlanConfig(model="82b", gpus=8, gpu_mem=80, offload="none", activation_checkpointing=True))
    assert not est["fits"]
    # 18 bytes x 81.1B parameters / 8 GPUs + the gathered embedding: about 172 GiB of model states per GPU.
    assert 170 * GB < _states(est) < 174 * GB
    assert _states(est) > 2 * 80 * GB


def test_82b_fits_the_papers_cluster_with_pipeline_stages():
    cfg = PlanConfig(model="82b", gpus=8, nodes=128, gpu_mem=80, parallel="pipeline", pipeline_stages=16, activation_checkpointing=True)
    assert estimate(cfg)["fits"]
    fewer = PlanConfig(model="82b", gpus=8, nodes=128, gpu_mem=80, parallel="pipeline", pipeline_stages=4, activation_checkpointing=True)
    assert not estimate(fewer)["fits"]
    assert "--parallel pipeline --pipeline-stages" in " ".join(suggest(fewer))


def _saved_activation_bytes(cfg: ModelConfig, batch: int, prepare=None) -> int:
    """Bytes autograd keeps for backward, parameters excluded, each storage once (``prepare(model)`` may wrap it first)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    if prepare:
        prepare(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("shape", [(4, 128, 4, 128, 2, 512, "gpt3"), (2, 256, 8, 256, 2, 2048, "gpt3"), (4, 128, 4, 128, 2, 512, "llama"),
                                   (2, 256, 8, 256, 2, 2048, "llama")])
def test_activation_estimate_within_20_percent_of_measured(shape):
    layers, d, heads, seq, batch, vocab, arch = shape
    cfg = ModelConfig(arch=arch, n_layer=layers, n_embd=d, n_head=heads, block_size=seq, vocab_size=vocab)
    measured = _saved_activation_bytes(cfg, batch)
    planned = activation_bytes(cfg, layers, batch * seq, 4, checkpointing=False, head=True)
    assert planned == pytest.approx(measured, rel=0.2)


def test_pipeline_stages_and_checkpointing_reduce_memory():
    base = PlanConfig(model="13b", gpus=8, gpu_mem=80, parallel="pipeline", pipeline_stages=2)
    more = PlanConfig(model="13b", gpus=8, gpu_mem=80, parallel="pipeline", pipeline_stages=8)
    assert estimate(more)["bytes"]["parameters"] < estimate(base)["bytes"]["parameters"]
    b = estimate(base)["bytes"]
    assert b["activations_with_checkpointing"] < b["activations_without_checkpointing"]


def test_bad_plans_are_refused():
    with pytest.raises(ClovaError, match="cannot be split"):
        PlanConfig(model="1.3b", gpus=8, parallel="pipeline", pipeline_stages=3)
    with pytest.raises(ClovaError, match="offload is a ZeRO-3 feature"):
        PlanConfig(parallel="pipeline", offload="cpu")
    with pytest.raises(ClovaError, match="unknown model preset"):
        estimate(PlanConfig(model="7b"))


def test_cli_plan_table_and_json():
    r = runner.invoke(app, ["plan", "--model", "82b", "--gpus", "8", "--gpu-mem", "80", "--parallel", "zero3"])
    assert r.exit_code == 0, r.output
    assert "fits" in r.output and "no" in r.output and "81,084,436,480" in r.output
    r = runner.invoke(app, ["plan", "--model", "82b", "--gpus", "8", "--gpu-mem", "80"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "no layout fits this cluster" in r.output and "does not fit" in r.output
    r = runner.invoke(app, ["plan", "--model", "1.3b", "--gpus", "8", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["fits"] is True and data["parameters"] == num_params(ModelConfig.from_name("1.3b"))
    # The fields docs/plan.md documents, for the chosen layout.
    for key in ("step_seconds", "days", "tokens_per_second", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "memory_gb_per_gpu",
                "fits", "time_split", "layout", "command", "alternatives"):
        assert key in data, key
    assert set(data["time_split"]) == {"compute", "communication", "bubble"}
    assert data["step_seconds"] == pytest.approx(sum(data["time_split"].values()))
    assert data["command"] == "clova train " + data["flags"] and data["layout"]["parallel"] in ("zero1", "zero2")
    assert data["days"] == pytest.approx(150e9 / data["tokens_per_second"] / 86400)
    r = runner.invoke(app, ["plan", "--model", "1.3b", "--gpu-type", "tpu"])
    assert r.exit_code != 0 and "unknown --gpu-type" in r.output


def test_tensor_parallel_splits_the_block_matrices_and_the_activations_inside_a_node():
    import dataclasses

    from clova_train.training.plan import tensor_parallel_params

    base = PlanConfig(model="13b", gpus=8, nodes=4, parallel="zero1", micro_batch=1)
    one, eight = estimate(base), estimate(dataclasses.replace(base, tensor_parallel=8))
    m = ModelConfig.from_name("13b", vocab_size=base.vocab_size)
    split = tensor_parallel_params(m)
    assert 0.9 * num_params(m) < split < num_params(m)  # the block matrices are nearly all of a GPT-3
    assert eight["bytes"]["parameters"] == pytest.approx(one["bytes"]["parameters"] * (num_params(m) - split * 7 / 8) / num_params(m))
    assert eight["data_parallel"] == 4 and one["data_parallel"] == 32
    assert eight["bytes"]["activations"] < one["bytes"]["activations"]
    with pytest.raises(ClovaError, match="must divide the 8 GPUs of a node"):
        PlanConfig(model="13b", gpus=8, tensor_parallel=3)


def test_the_plan_counts_the_parameters_of_the_model_the_run_builds():
    """One count: the plan's equals the model's at any --seq-len up to the preset's context (issue 23, point 9)."""
    for seq_len in (64, 128, 256):
        est = estimate(PlanConfig(model="tiny", gpus=1, vocab_size=2048, seq_len=seq_len))
        assert est["parameters"] == num_params(ModelConfig.from_name("tiny", vocab_size=2048))


def test_custom_shapes_from_flags_and_a_model_config_file(tmp_path):
    """A shape given as flags or as a model config file plans the model it describes, counted off the model."""
    from clova_train.training.plan import model_config

    flags = PlanConfig(model="custom", shape=dict(n_layer=6, n_embd=512, n_head=8), gpus=1)
    assert estimate(flags)["parameters"] == num_params(ModelConfig(n_layer=6, n_embd=512, n_head=8))
    over = PlanConfig(model="1.3b", shape={"n_layer": 12}, gpus=1)  # a preset with one field changed
    assert model_config(over) == ModelConfig.from_name("1.3b", n_layer=12)
    run_cfg = tmp_path / "config.json"
    run_cfg.write_text(json.dumps({"model": {"name": "mine", "n_layer": 6, "n_embd": 512, "n_head": 8, "vocab_size": 4096}, "train": {}}))
    r = runner.invoke(app, ["plan", "--model-config", str(run_cfg), "--gpus", "2", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["parameters"] == num_params(ModelConfig(name="mine", n_layer=6, n_embd=512, n_head=8, vocab_size=4096))
    r = runner.invoke(app, ["plan", "--n-layer", "6", "--n-embd", "512", "--n-head", "8", "--gpus", "2", "--parallel", "zero2", "--micro-batch", "4", "--json"])
    fixed = json.loads(r.stdout)
    assert fixed["layout"]["parallel"] == "zero2" and fixed["layout"]["micro_batch"] == 4 and "alternatives" not in fixed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layers": 6}))
    r = runner.invoke(app, ["plan", "--model-config", str(bad)])
    assert r.exit_code != 0 and "unknown key(s) n_layers" in r.output and str(bad) in r.output
    r = runner.invoke(app, ["plan", "--n-layer", "6", "--n-embd", "500", "--n-head", "8"])
    assert r.exit_code != 0 and "not divisible" in r.output


def test_search_holds_given_fields_and_says_why_others_lose():
    from clova_train.training.plan import rank, why_slower

    cfg = PlanConfig(model="13b", gpus=8, nodes=4)
    ranked = rank(cfg, {"tensor_parallel": 4, "activation_checkpointing": True})
    assert ranked and all(x.plan.tensor_parallel == 4 and x.plan.activation_checkpointing for x in ranked)
    assert [x.time["step_seconds"] for x in ranked if x.fits] == sorted(x.time["step_seconds"] for x in ranked if x.fits)
    everything = rank(cfg)
    best = everything[0]
    assert best.fits and best.time["step_seconds"] <= ranked[0].time["step_seconds"]
    assert all(cfg.global_batch % (x.plan.micro_batch * x.plan.data_parallel) == 0 for x in everything)
    reasons = {why_slower(x, best) for x in everything[1:]}
    assert any(r.startswith("does not fit") for r in reasons) and any("bubble" in r for r in reasons)


def test_one_device_never_picks_zero3():
    """On one device every ZeRO stage moves nothing; the plan keeps the whole model (ZeRO-1), never pays ZeRO-3's gathers."""
    from clova_train.training.plan import rank

    best = rank(PlanConfig(model="1.3b", gpus=1, gpu_mem=80))[0]
    assert best.fits and best.plan.parallel == "zero1" and best.time["time_split"]["communication"] == 0


def test_calibrate_needs_cuda_and_a_stored_figure_replaces_the_profiles(tmp_path, monkeypatch):
    from clova_train.training.planner.hardware import PROFILES, record_efficiency

    monkeypatch.setenv("CLOVA_CALIBRATION", str(tmp_path / "calibration.json"))
    r = runner.invoke(app, ["plan", "--model", "tiny", "--gpus", "1", "--calibrate", "--json"])
    if torch.cuda.is_available():  # on a GPU: measured, stored, and this plan's figure
        assert r.exit_code == 0, r.output
        stored = json.loads((tmp_path / "calibration.json").read_text())
        assert json.loads(r.stdout)["hardware"]["kernel_efficiency"] == next(iter(stored.values()))["kernel_efficiency"]
    else:
        assert r.exit_code != 0 and "--calibrate measures a GPU and needs CUDA" in r.output and len(r.output.strip().splitlines()) == 1
    record_efficiency("h100", 0.41, {"device": "test"})
    h100 = estimate(PlanConfig(model="1.3b", gpu_type="h100"))
    assert h100["hardware"]["kernel_efficiency"] == 0.41 != PROFILES["h100"].kernel_efficiency
    faster = estimate(PlanConfig(model="1.3b", gpu_type="h100", kernel_efficiency=0.82))  # a flag beats the stored figure
    assert faster["time_split"]["compute"] == pytest.approx(h100["time_split"]["compute"] / 2)
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(ClovaError, match="calibration.json: not a calibration file"):
        PlanConfig(model="1.3b", gpu_type="h100")


def test_llama_plans_count_its_own_block():
    """--arch llama plans the preset's depth and width with the llama block: its parameters (GQA, SwiGLU, untied head) and
    its activations, which are larger per token than gpt3's (fp32 RMSNorm, repeated key/value heads, SwiGLU's four)."""
    from clova_train.model.gpt import num_params

    gpt3 = estimate(PlanConfig(model="1.3b", gpus=8, gpu_mem=80, parallel="zero1"))
    llama = estimate(PlanConfig(model="1.3b", gpus=8, gpu_mem=80, parallel="zero1", shape={"arch": "llama"}))
    assert llama["parameters"] == num_params(ModelConfig.from_name("1.3b", arch="llama", vocab_size=51200))
    assert llama["parameters"] != gpt3["parameters"]
    assert llama["bytes"]["activations_without_checkpointing"] > gpt3["bytes"]["activations_without_checkpointing"]
