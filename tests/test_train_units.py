"""`clova train`'s pieces, one process and no DeepSpeed engine: data order, configs, launch, checkpoints, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.training.data.sampler import DataConfig, PackedDataset, TrainStream, blend, data_config_from_specs, eval_batches, eval_windows, parse_data_spec
from clova_train.core.errors import ClovaError
from clova_train.shards.format import read_manifest
from clova_train.training.worker import WORKER_MODULE
from clova_train.training.launch import LaunchConfig, deepspeed_command, expand_first_host, read_hostfile, slurm_rank_env, world_size
from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config, load_template, template_defaults
from clova_train.training.parallel.engine import param_groups
from clova_train.training.parallel.pipeline import pipeline_layer_names, pipeline_layers, pipeline_names
from clova_train.training.rundir import MARKER_FILE
from clova_train.training.trainer.step import BadStepGuard
from clova_train.training.checkpoints.checkpoint import Checkpointer, Faults, tag_for
from clova_train.training.parallel.distributed import CollectiveError
from clova_train.training.trainer.metrics import MetricsLogger, plot_losses
from clova_train.training.run.config import RunSpec, TrainConfig, TrainRequest, lr_at
from clova_train.training.run.resolve import prepare

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "deepspeed_configs").glob("*.json"))


class FakeShard:
    """IndexedDataset's reading surface over documents given as lists."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.sizes = np.array([len(d) for d in self.docs], dtype=np.int32)

    def __len__(self):
        return len(self.docs)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        return d[offset:] if length is None else d[offset : offset + length]


def synthetic(n_docs: int, seed: int, eod: int = 0, base: int = 1) -> FakeShard:
    rng = np.random.default_rng(seed)
    return FakeShard([list(rng.integers(base, base + 1000, rng.integers(1, 40))) + [eod] for _ in range(n_docs)])


# ------------------------------------------------------------------ data


def test_windows_cover_the_token_stream_once_per_epoch():
    shard = synthetic(50, 0)
    ds = PackedDataset([shard], seq_len=16, seed=3)
    order, starts, windows = ds._epoch(0)
    stream = np.concatenate([shard.docs[i] for i in order])
    assert sorted(windows.tolist()) == list(range(len(ds)))
    for k in range(len(ds)):
        j = int(windows[k])
        assert np.array_equal(ds[k], stream[j * 16 : j * 16 + 17])
    # Epoch 1 has its own document order; its samples follow epoch 0's.
    assert not np.array_equal(ds._epoch(1)[0], order)
    assert len(ds[len(ds) + 3]) == 17


def test_packing_spans_shards_and_keeps_eod():
    a, b = synthetic(5, 1), synthetic(7, 2)
    ds = PackedDataset([a, b], seq_len=8, seed=0, shuffle=False)
    stream = np.concatenate(a.docs + b.docs)
    assert ds.n_tokens == len(stream)
    assert all(np.array_equal(ds[k], stream[k * 8 : k * 8 + 9]) for k in range(len(ds)))


def test_blend_follows_weights_and_resumes_from_counts():
    w = np.array([0.7, 0.2, 0.1])
    counts = np.zeros(3, dtype=np.int64)
    choice, index = blend(w, 0, counts, 1000)
    assert np.allclose(np.bincount(choice) / 1000, w, atol=0.002)
    # Each dataset's samples are taken in order, none twice.
    for d in range(3):
        assert index[choice == d].tolist() == list(range(int((choice == d).sum())))
    # Continuing from (position, counts) gives the same as one long call.
    c1 = np.zeros(3, dtype=np.int64)
    first, _ = blend(w, 0, c1, 400)
    rest, _ = blend(w, 400, c1, 600)
    assert np.array_equal(np.concatenate([first, rest]), choice)


def _streams(world, micro=2, global_batch=8):
    datasets = [PackedDataset([synthetic(80, 5)], 16, 7, stream=0, name="a"), PackedDataset([synthetic(60, 6, base=2000)], 16, 7, stream=1, name="b")]
    return [TrainStream(datasets, [3, 1], global_batch=global_batch, micro_batch=micro, rank=r, world=world) for r in range(world)]


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one, = _streams(1)
    two = _streams(2)
    four = _streams(4, micro=1)
    for _ in range(5):
        whole = np.concatenate([mb.numpy() for mb in one.next_batch()])
        split2 = np.concatenate([mb.numpy() for s in two for mb in s.next_batch()])
        split4 = np.concatenate([mb.numpy() for s in four for mb in s.next_batch()])
        assert np.array_equal(whole, split2) and np.array_equal(whole, split4)
    assert one.state_dict() == two[0].state_dict() == four[3].state_dict()


def test_stream_resumes_exactly_from_its_state():
    a, = _streams(1)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as stored in a checkpoint
    expected = [mb.numpy().copy() for mb in a.next_batch()]
    b, = _streams(1)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y.numpy()) for x, y in zip(expected, b.next_batch()))
    assert "global samples 24..31" in b.describe(state)


def test_stream_and_eval_refusals():
    ds = [PackedDataset([synthetic(80, 5)], 16, 7)]
    with pytest.raises(ClovaError, match="not a multiple of micro-batch 3 x 2 ranks"):
        TrainStream(ds, [1], global_batch=8, micro_batch=3, rank=0, world=2)
    tiny = PackedDataset([FakeShard([[1, 2, 0]])], 16, 7, name="tiny-dir")
    with pytest.raises(ClovaError, match="tiny-dir.*fewer than one sample"):
        TrainStream([tiny], [1], global_batch=2, micro_batch=1, rank=0, world=1)
    valid = PackedDataset([synthetic(20, 9)], 16, 0, shuffle=False)
    batches = [eval_batches(valid, 10, micro_batch=2, rank=r, world=2) for r in range(2)]
    assert [len(b) for b in batches] == [2, 2]  # 10 rounded down to 8 = 2 ranks x 2 micro-batches x 2
    # The windows are spread over the whole valid stream by a stride, not the first 8 in file order.
    picks = eval_windows(len(valid), 10, 4)
    assert len(picks) == 8 and picks[-1] >= len(valid) - len(valid) // 8 and np.all(np.diff(picks) == len(valid) // 8)
    assert np.array_equal(batches[1][0][0].numpy(), valid[int(picks[4])])
    assert eval_batches(tiny, 8, micro_batch=1, rank=0, world=1) == []


def test_data_specs():
    assert parse_data_spec("shards/ko:3") == ("shards/ko", 3.0)
    assert parse_data_spec("shards/ko") == ("shards/ko", None)
    assert parse_data_spec("C:/weird:dir") == ("C:/weird:dir", None)
    assert data_config_from_specs(["a:2", "b:1"]) == DataConfig(paths=["a", "b"], weights=[2.0, 1.0])
    with pytest.raises(ClovaError, match="to every shard dir"):
        data_config_from_specs(["a:2", "b"])
    with pytest.raises(ClovaError, match="listed twice"):
        DataConfig(paths=["a", "a"])


# ------------------------------------------------------------------ configs


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=110)
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_decay_tokens_and_batch_rampup_follow_their_formulas():
    import functools

    from clova_train.training.run.config import rampup_batch

    # GPT-3 with Megatron's ramp: 32 -> 1024 by 32 (31 increments) over 6,400 sequences; warm-up 10 steps; decay to 10% by 3M tokens.
    seq, start, inc, ramp_tokens, decay = 64, 32, 32, 64 * 6_400, 3_000_000
    cfg = TrainConfig(seq_len=seq, global_batch=1024, micro_batch=2, lr=6e-4, min_lr=6e-5, warmup=10, steps=200,
                      batch_rampup=[start, inc, ramp_tokens], decay_tokens=decay)
    consumed, per_increment = 0, 6_400 / 31
    for step in range(1, 201):
        batch = min(1024, start + inc * math.floor(consumed / per_increment))  # Megatron's rule, on samples consumed before the step
        assert cfg.batch_at(step) == batch, step
        consumed += batch
        assert cfg.samples_through(step) == consumed
        tokens, warm = consumed * seq, cfg.tokens_through(10)
        if step <= 10:
            expected = 6e-4 * step / 10
        elif tokens >= decay:
            expected = 6e-5  # held at the floor once the decay budget is spent
        else:
            expected = 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + math.cos(math.pi * (tokens - warm) / (decay - warm)))
        assert lr_at(step, cfg) == pytest.approx(expected, rel=1e-12), step
    assert cfg.batch_at(1) == 32 and cfg.batch_at(200) == 1024 and lr_at(200, cfg) == 6e-5
    assert [cfg.batch_at(s) for s in range(1, 60)] == sorted(cfg.batch_at(s) for s in range(1, 60))

    # Without the new options, the schedule is the old one bit for bit: (step - warmup) / (steps - warmup) of a cosine.
    plain = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=7, steps=113)
    for step in range(8, 114):
        old = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1.0 + math.cos(math.pi * min(1.0, (step - 7) / max(1, 113 - 7))))
        assert lr_at(step, plain) == old
    # --train-tokens and the default warm-up count the ramp's smaller steps.
    from clova_train.model.config import ModelConfig

    by_tokens = TrainConfig(seq_len=seq, global_batch=1024, micro_batch=2, train_tokens=cfg.tokens_through(150), batch_rampup=[start, inc, ramp_tokens])
    assert by_tokens.resolved(ModelConfig.from_name("tiny")).steps == 150

    # The sample order is the one global order: a ramped stream cuts the fixed-batch stream's samples into other steps.
    ramp = functools.partial(rampup_batch, start=2, increment=2, ramp_samples=12, global_batch=8)
    ramped, = _streams(1)
    ramped.batch_at = ramp
    fixed, = _streams(1)
    got = np.concatenate([mb.numpy() for _ in range(6) for mb in ramped.next_batch()])
    assert ramped.position == 2 + 2 + 4 + 6 + 8 + 8
    want = np.concatenate([mb.numpy() for _ in range(5) for mb in fixed.next_batch()])[:ramped.position]
    assert np.array_equal(got, want)
    for bad in ([0, 32, 100], [48, 32, 100], [33, 33, 100], [32, 32]):
        with pytest.raises(ClovaError, match="batch_rampup"):
            TrainConfig(global_batch=1024, micro_batch=2, batch_rampup=bad)


def test_train_config_resolution_and_checks():
    from clova_train.model.config import ModelConfig

    m = ModelConfig.from_name("1.3b")
    r = TrainConfig(train_tokens=150_000_000_000).resolved(m)
    assert r.lr == 2e-4 and r.min_lr == pytest.approx(2e-5)
    assert r.steps == math.ceil(150e9 / (1024 * 2048)) and r.train_tokens is None
    assert r.warmup == math.ceil(375e6 / (1024 * 2048))  # GPT-3's warm-up
    assert TrainConfig(steps=50, global_batch=8, seq_len=64).resolved(m).warmup == 5  # at most a tenth
    with pytest.raises(ClovaError, match="--steps N or --train-tokens N"):
        TrainConfig().resolved(m)
    with pytest.raises(ClovaError, match="not both"):
        TrainConfig(steps=1, train_tokens=5)
    with pytest.raises(ClovaError, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_shipped_deepspeed_template_parses_and_resolves(template):
    t = load_template(template)
    train_defaults, par_defaults = template_defaults(t)
    train = TrainConfig(steps=10, global_batch=16, micro_batch=2, lr=1e-3, min_lr=1e-4, warmup=1, grad_clip=train_defaults.get("grad_clip", 1.0))
    par = ParallelConfig(**par_defaults)
    pipeline = "pipeline" in template.name
    assert par.mode == ("pipeline" if pipeline else "zero3")
    for cuda in (False, True):
        ds = deepspeed_config(t, train, par, world=4, cuda=cuda, tensorboard_dir="/tmp/tb")
        assert ds["train_batch_size"] == 16
        # zero3: 4 data-parallel ranks; pipeline (one stage per rank): 1 replica.
        assert ds["gradient_accumulation_steps"] == (8 if pipeline else 2)
        assert ds["zero_optimization"]["stage"] == (1 if pipeline else 3)
        assert ds["optimizer"]["params"]["torch_adam"] is True if not cuda else "torch_adam" not in ds["optimizer"]["params"]
        assert ds["bf16"]["enabled"] is cuda  # precision auto
        assert ds["tensorboard"]["enabled"] is True
        for key, value in t["zero_optimization"].items():  # tuning kept; "auto" sizes left to DeepSpeed without a width
            if not key.startswith("offload") and value != "auto":
                assert ds["zero_optimization"][key] == value
        assert "auto" not in ds["zero_optimization"].values()
    if "offload" in template.name:
        assert par.offload == "cpu"
        off = deepspeed_config(t, train, ParallelConfig(offload="none"), world=1, cuda=True, tensorboard_dir=None)
        assert "offload_param" not in off["zero_optimization"]  # --offload none beats the template


def test_parallel_modes_refuse_what_deepspeed_cannot_do():
    with pytest.raises(ClovaError, match="ZeRO-3 feature.*use --parallel zero3 --offload cpu"):
        ParallelConfig(mode="pipeline", offload="cpu")
    with pytest.raises(ClovaError, match="ZeRO-3 with 4 pipeline stages: DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only"):
        ParallelConfig(pipeline_stages=4)
    with pytest.raises(ClovaError, match="6 ranks cannot form 4 pipeline stages"):
        ParallelConfig(mode="pipeline", pipeline_stages=4).stages(6)
    assert ParallelConfig(mode="pipeline").stages(8) == 8 and ParallelConfig().stages(8) == 1


def test_pipeline_names_cover_the_model():
    from clova_train.model.gpt import GPT
    from clova_train.model.config import ModelConfig

    cfg = ModelConfig.from_name("tiny", vocab_size=256, block_size=16)
    names = pipeline_names(cfg)
    assert sorted(names.values()) == sorted(n for n, _ in GPT(cfg).named_parameters())
    assert names["tied_modules.embed.wte.weight"] == "wte.weight" and names["4.weight"] == "ln_f.weight"
    assert names["3.attn.qkv.weight"] == "blocks.1.attn.qkv.weight"
    # Layer files: layer 0 holds the tied embedding; the head tied to it (the last layer) owns nothing.
    files = pipeline_layer_names(cfg)
    assert files[0] == {"wte.weight": "wte.weight"} and files[-1] == {} and files[4] == {"weight": "ln_f.weight", "bias": "ln_f.bias"}
    assert len(files) == len(pipeline_layers(cfg)) == cfg.n_layer + 4


def test_partition_is_checked_recorded_and_handed_to_deepspeed(tmp_path, korean_shards, monkeypatch):
    import torch

    from clova_train.training.parallel.distributed import Dist
    from clova_train.training.parallel.pipeline import PipelineEngine
    from clova_train.training.trainer.loop import run_config

    for bad, why in (("balanced", "must be parameters, uniform or type:REGEX"), ("type:", "must be parameters"),
                     ("type:Bl(ock", "not a regular expression"), ("type:a:b", "cannot contain ':'")):
        with pytest.raises(ClovaError, match=why):
            ParallelConfig(mode="pipeline", partition=bad)
    with pytest.raises(ClovaError, match="--partition uniform cuts pipeline stages and ZeRO-3 has none"):
        ParallelConfig(partition="uniform")
    req = TrainRequest(out=str(tmp_path / "run"), model="tiny", data=[str(korean_shards)], train={"steps": 2, "seq_len": 64, "global_batch": 4},
                       parallel={"mode": "pipeline", "partition": "type:LayerNorm"})
    with pytest.raises(ClovaError, match="matches 1 of the pipeline's 6 layers .*each of the 2 stages needs one"):
        prepare(req, world_size=2, check=False)
    req.parallel["partition"] = "type:block"  # DeepSpeed matches class names ignoring case
    spec = prepare(req, world_size=2, check=False)
    assert spec.parallel.partition == "type:block" and spec.identity["parallel"] == {"mode": "pipeline"}  # the layout may change on resume
    ds = deepspeed_config({}, spec.train, spec.parallel, world=2, cuda=False, tensorboard_dir=None)
    assert run_config(spec, spec.train, ds, "cpu")["parallel"]["partition"] == "type:block"

    seen = {}

    class Built(Exception):
        pass

    def module(**kwargs):
        seen.update(kwargs)
        raise Built

    import clova_train.training.parallel.pipeline as pipeline
    from clova_train.training.parallel.dims import ParallelDims

    monkeypatch.setattr(pipeline, "_pipeline_module", lambda cfg: module)  # our PipelineModule subclass, as built
    with pytest.raises(Built):
        PipelineEngine(spec.model, ds, spec.parallel, ParallelDims.from_config(spec.parallel, 2), seed=0, dist=Dist(0, 2, 0, 2, torch.device("cpu")))
    assert seen["partition_method"] == "type:block" and seen["num_stages"] == 2
    assert seen["checkpointable_layers"] == ["Block", "LlamaBlock"]  # either arch's blocks, never the embedding: reentrant checkpointing of ids breaks backward
    assert [type(s).__name__ for s in seen["layers"]] == ["TiedLayerSpec", "LayerSpec", "LayerSpec", "LayerSpec", "LayerSpec", "TiedLayerSpec"]


def _one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "Traceback" not in r.output and r.output.count("error:") == 1, r.output
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize(
    "route",
    ["flag --pipeline-stages", "flag --parallel pipeline + zero3.json", "json stage 3 + stages", "json stage 2 + stages", "json stage 2 + flag"],
)
def test_zero_2_or_3_with_pipeline_stages_is_one_line_naming_both_modes(route, tmp_path, korean_shards):
    ds = tmp_path / "ds.json"
    extra = {
        "flag --pipeline-stages": ["--pipeline-stages", "2"],
        "flag --parallel pipeline + zero3.json": ["--parallel", "pipeline", "--deepspeed", str(REPO / "deepspeed_configs" / "zero3.json")],
        "json stage 3 + stages": ["--deepspeed", str(ds)],
        "json stage 2 + stages": ["--deepspeed", str(ds)],
        "json stage 2 + flag": ["--deepspeed", str(ds), "--parallel", "pipeline"],
    }[route]
    stage = 2 if "stage 2" in route else 3
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, **({"pipeline": {"stages": 2}} if "stages" in route else {})}))
    r = CliRunner().invoke(app, _train_args(korean_shards, tmp_path / "run", "--nproc-per-node", "2", *extra), env={"COLUMNS": "400"})
    if route == "json stage 2 + flag":  # no pipeline stages asked for: ZeRO-2 alone is refused as a stage clova does not run
        _one_line_error(r, "ZeRO stage 2", "--parallel zero3", "--parallel pipeline")
    else:
        _one_line_error(r, "DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only", "choose --parallel zero3", "or --parallel pipeline --pipeline-stages N")
    assert not (tmp_path / "run").exists()


def test_train_prints_the_plan_and_refuses_what_cannot_fit_unless_forced(tmp_path, korean_shards):
    import io

    from rich.console import Console

    from clova_train.training.run.preflight import memory_check

    req = TrainRequest(out=str(tmp_path / "run"), model="1.3b", data=[str(korean_shards)], train={"steps": 1, "seq_len": 64, "global_batch": 8},
                       parallel={"mode": "zero3"})
    spec = prepare(req, world_size=2, check=False)
    shown = Console(record=True, width=200, file=io.StringIO())
    with pytest.raises(CollectiveError, match=r"1.3b needs about .* GiB per rank \(of 0.9 usable on Fake 1GB\).*try --offload cpu .*or pass --force"):
        memory_check(spec, "bf16", "Fake 1GB", 1.0, 2, show=shown.print)
    table = shown.export_text()
    assert "plan: 1.3b on 1 x 2 Fake 1GB ranks of 1 GB (zero3, bf16)" in table and "fits" in table and "no" in table
    assert "would fit with" in table and "time for" not in table  # no known peak for this device
    forced = prepare(TrainRequest(**{**req.__dict__, "force": True}), world_size=2, check=False)
    assert forced.force and RunSpec.from_json(forced.to_json()).force
    est = memory_check(forced, "bf16", "Fake 1GB", 1.0, 2, show=None)
    assert est is not None and not est["fits"]
    # A device with a known peak also gets the time row, as `clova plan` shows it.
    shown = Console(record=True, width=200, file=io.StringIO())
    assert memory_check(spec, "bf16", "NVIDIA A100-SXM4-80GB", 79.3, 2, show=shown.print)["fits"]
    table = shown.export_text()
    assert "time for 512 tokens" in table and "of 312" in table and "step time" in table


def test_template_values_become_defaults_and_bad_stage_is_refused():
    t = {"train_batch_size": 64, "gradient_clipping": 0.5, "bf16": {"enabled": True}, "optimizer": {"params": {"lr": "auto", "betas": [0.9, 0.99]}},
         "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}
    train, par = template_defaults(t)
    assert train == {"global_batch": 64, "grad_clip": 0.5, "precision": "bf16", "beta1": 0.9, "beta2": 0.99}
    assert par == {"mode": "zero3", "offload": "nvme", "nvme_path": "/nvme"}
    assert template_defaults({"zero_optimization": {"stage": 2}})[1] == {"mode": "zero2"}
    with pytest.raises(ClovaError, match="ZeRO stage 4"):
        template_defaults({"zero_optimization": {"stage": 4}})
    assert template_defaults({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 4}})[1] == {"mode": "pipeline", "pipeline_stages": 4}


def test_no_weight_decay_on_biases_and_layernorms():
    from clova_train.model.gpt import GPT
    from clova_train.model.config import ModelConfig

    model = GPT(ModelConfig.from_name("tiny", vocab_size=256, block_size=16))
    decay, plain = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    named = dict(model.named_parameters())
    assert ids(decay["params"]) == ids(p for n, p in named.items() if n.endswith("weight") and "ln_" not in n)
    assert ids(plain["params"]) == ids(p for n, p in named.items() if n.endswith("bias") or "ln_" in n)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)


# ------------------------------------------------------------------ launch


def test_slurm_task_becomes_a_rank(monkeypatch):
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0",
           "PATH": "/nonexistent"}  # no scontrol: the node list is read directly
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert slurm_rank_env() == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                "MASTER_ADDR": "gpu007", "MASTER_PORT": str(29500 + 123)}
    assert slurm_rank_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})["MASTER_ADDR"] == "head"
    assert world_size(LaunchConfig()) == (16, True)
    with pytest.raises(ClovaError, match="each task is one rank"):
        world_size(LaunchConfig(nproc_per_node=8))
    # A batch script (no srun step) is not a rank: it starts local workers.
    monkeypatch.delenv("SLURM_STEP_ID")
    assert world_size(LaunchConfig(nproc_per_node=2)) == (2, False)


def test_node_lists_and_hostfiles(tmp_path):
    assert expand_first_host("node[003-005,9],cpu1") == "node003"
    assert expand_first_host("a1,a2") == "a1"
    shutil.copy(REPO / "cli" / "hostfile.example", tmp_path / "hosts")
    assert read_hostfile(tmp_path / "hosts") == [("node001", 8), ("node002", 8)]
    cfg = LaunchConfig(hostfile=str(tmp_path / "hosts"))
    assert world_size(cfg) == (16, False)
    cmd = deepspeed_command(tmp_path / "launch.json", cfg, WORKER_MODULE)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and cmd[-3:] == ["--module", "clova_train.training.worker", str(tmp_path / "launch.json")]
    (tmp_path / "bad").write_text("node1 8\n")
    with pytest.raises(ClovaError, match="bad:1: expected 'HOST slots=N'"):
        read_hostfile(tmp_path / "bad")


def test_shipped_sbatch_calls_clova_train():
    text = (REPO / "cli" / "train.sbatch").read_text()
    assert "srun" in text and "clova train" in text and "--signal=USR1" in text


# ------------------------------------------------------------------ loop pieces


def test_bad_step_guard_counts_and_stops():
    g = BadStepGuard(3)
    for step, bad in enumerate([True, False, True, True], 1):
        g.update(bad, step, "here")
    assert (g.total, g.consecutive) == (3, 2)
    with pytest.raises(CollectiveError, match=r"step 5: 3 consecutive .*\(data: global samples 40\.\.47"):
        g.update(True, 5, "global samples 40..47 (x)")


def test_faults_parse():
    f = Faults("kill_at_step=6; nan_at_steps=3,4")
    assert f.kill_at_step == 6 and f.nan_at_steps == {3, 4} and f.kill_in_save is None
    with pytest.raises(ClovaError, match="unknown fault"):
        Faults("explode=1")


def test_checkpoint_scan_ignores_incomplete_and_prune_keeps_last(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (4, 8, 12, 16):
        (d / tag_for(step)).mkdir(parents=True)
        (d / tag_for(step) / "model_states.pt").write_bytes(b"x")
        if step != 16:  # step 16's save was killed before its marker
            (d / tag_for(step) / MARKER_FILE).write_text(json.dumps({"step": step}))
    assert Checkpointer.complete(d) == [(4, "step_00000004"), (8, "step_00000008"), (12, "step_00000012")]
    ck = Checkpointer(tmp_path, None, rank=0, world=1, keep_last=2)
    ck.prune()
    assert sorted(p.name for p in d.iterdir()) == ["step_00000008", "step_00000012"]


def test_metrics_resume_drops_the_interrupted_attempt(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True)
    for s in range(1, 7):
        m.log({"step": s, "loss": 10.0 - s, "tokens": 100 * s, **({"valid_loss": 9.5 - s} if s % 2 == 0 else {})})
    m.log({"step": 7, "loss": float("nan"), "tokens": 700})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # cut by a kill
    m2 = MetricsLogger(tmp_path, enabled=True)
    m2.resume_at(4)
    assert [r["step"] for r in m2.records] == [1, 2, 3, 4]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    plot_losses(m2.records, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_metrics_backend_is_one_class_and_sees_what_metrics_jsonl_holds(tmp_path):
    from clova_train.training.trainer.loggers import MetricsBackend

    class Collect(MetricsBackend):
        def __init__(self):
            self.seen, self.closed = [], False

        def log(self, record):
            self.seen.append(dict(record))

        def amend(self, record):
            self.seen[-1] = dict(record)

        def close(self):
            self.closed = True

    extra = Collect()
    m = MetricsLogger(tmp_path, enabled=True, backends=[extra])
    for s in range(1, 4):
        m.log({"step": s, "loss": float("inf") if s == 2 else 1.0 / s, "tokens": 10 * s})
    m.amend({"save_seconds": 0.5})
    m.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert extra.seen == written and written[1]["loss"] is None and written[-1]["save_seconds"] == 0.5 and extra.closed
    silent = Collect()
    MetricsLogger(tmp_path, enabled=False, backends=[silent]).log({"step": 4, "loss": 0.1, "tokens": 40})
    assert silent.seen == []  # only rank 0 logs


# ------------------------------------------------------------------ refused before step 1


def _train_args(shards, out, *extra):
    return ["train", "--model", "tiny", "--data", str(shards), "--out", str(out), "--steps", "2", "--seq-len", "64", "--global-batch", "4", *extra]


@pytest.mark.parametrize("extra, said", [
    (["--eval-task", "nsmc"], "expected TASK=DATA[:TRAIN]"),
    (["--eval-task", "nosuch=x.tsv"], "nosuch"),
    (["--eval-task", "nsmc=x.tsv", "--eval-shots", "2"], "needs demonstrations: give TASK=DATA:TRAIN"),
    (["--eval-task", "nsmc=x.tsv", "--parallel", "pipeline"], "in pipeline mode the stages hold different layers"),
    (["--batch-rampup", "2,2"], "expected START,INCREMENT,TOKENS"),
    (["--micro-batch", "2", "--batch-rampup", "2,1,100"], "multiples of the micro-batch"),
])
def test_eval_task_and_batch_rampup_are_checked_in_one_line_before_step_1(extra, said, tmp_path, korean_shards):
    res = CliRunner().invoke(app, _train_args(korean_shards, tmp_path / "r", *extra))
    assert res.exit_code != 0 and said in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_vocabulary_mismatch_is_refused_before_step_1(tmp_path, korean_shards, konlpy_files):
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    other = tmp_path / "other-tok"
    train_tokenizer(konlpy_files[:3], other, TokenizerConfig(vocab_size=1500), show_progress=False)
    r = CliRunner().invoke(app, _train_args(korean_shards, tmp_path / "run", "--tokenizer", str(other)))
    assert r.exit_code == 2, r.output
    assert "was tokenized with tokenizer" in r.output and "retokenize" in r.output
    assert not (tmp_path / "run").exists()


def test_model_smaller_than_tokenizer_is_refused(tmp_path, korean_shards):
    cfg = tmp_path / "small-vocab.json"
    cfg.write_text(json.dumps({"model": {"name": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1024, "block_size": 256}}))
    r = CliRunner().invoke(app, ["train", "--config", str(cfg), "--data", str(korean_shards), "--out", str(tmp_path / "run"), "--steps", "2", "--seq-len", "64", "--global-batch", "4"])
    assert r.exit_code == 2
    assert "the tokenizer has 2000 tokens but the model only 1024 embeddings" in r.output


def test_corrupted_shard_is_refused_before_step_1(tmp_path, korean_shards):
    bad = tmp_path / "shards"
    shutil.copytree(korean_shards, bad)
    binfile = next(p for p in sorted(bad.glob("*.bin")) if p.stat().st_size > 100)
    raw = bytearray(binfile.read_bytes())
    raw[50] ^= 0xFF
    binfile.write_bytes(bytes(raw))
    r = CliRunner().invoke(app, _train_args(bad, tmp_path / "run"))
    assert r.exit_code == 2
    assert binfile.name in r.output and "sha256 differs" in r.output
    assert not (tmp_path / "run").exists()


def test_config_files_load_strictly(tmp_path, korean_shards):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"seq_len": 64, "learning_rate": 1}}))
    r = CliRunner().invoke(app, ["train", "--model", "tiny", "--config", str(cfg), "--data", str(korean_shards), "--out", str(tmp_path / "r"), "--steps", "1"])
    assert r.exit_code == 2 and "unknown key(s) learning_rate" in r.output
    cfg.write_text(json.dumps({"trian": {}}))
    r = CliRunner().invoke(app, ["train", "--model", "tiny", "--config", str(cfg), "--data", str(korean_shards), "--out", str(tmp_path / "r"), "--steps", "1"])
    assert r.exit_code == 2 and "unknown section(s) trian" in r.output


@pytest.mark.parametrize("section,bad,said", [
    ("model", {"n_layer": 2.7, "n_embd": 64, "n_head": 4}, "model.n_layer: expected an integer, got 2.7"),
    ("train", {"lr": "3e-4"}, 'train.lr: expected a number, got "3e-4"'),
    ("parallel", {"activation_checkpointing": "yes"}, 'parallel.activation_checkpointing: expected true or false, got "yes"'),
])
def test_a_wrong_config_type_is_refused_in_one_line_naming_the_key(section, bad, said, tmp_path, korean_shards):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({section: bad}))
    model = [] if section == "model" else ["--model", "tiny"]
    r = CliRunner().invoke(app, ["train", *model, "--config", str(cfg), "--data", str(korean_shards), "--out", str(tmp_path / "r"), "--steps", "1"],
                           env={"COLUMNS": "400"})
    _one_line_error(r, f"{cfg}: {said}")
    assert not (tmp_path / "r").exists()


def test_prepare_layers_template_file_and_flags(tmp_path, korean_shards, tokenizer_dir):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"seq_len": 64, "grad_clip": 0.3, "steps": 99}, "parallel": {"activation_checkpointing": True}}))
    req = TrainRequest(out=str(tmp_path / "run"), model="tiny", data=[f"{korean_shards}:2"], config=str(cfg),
                       deepspeed=str(REPO / "deepspeed_configs" / "zero3_offload.json"),
                       train={"steps": 7, "global_batch": 8}, parallel={"offload": None})
    spec = prepare(req, world_size=2, check=False)
    assert spec.train.grad_clip == 0.3  # the file beats the template's 1.0
    assert spec.train.steps == 7  # the flag beats the file
    assert spec.parallel.offload == "cpu" and spec.parallel.activation_checkpointing
    assert spec.model.vocab_size == 2048  # 2000 padded to a multiple of 128
    assert spec.tokenizer["hash"] and Path(spec.tokenizer["path"]) == Path(tokenizer_dir).resolve()
    assert spec.data.weights == [2.0]
    with pytest.raises(ClovaError, match="not a multiple of micro-batch 1 x 3 data-parallel replicas"):
        prepare(req, world_size=3, check=False)


def test_help_lists_the_megatron_style_flags():
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "220"})
    assert r.exit_code == 0
    for flag in ("--model", "--data", "--out", "--tokenizer", "--config", "--deepspeed", "--resume", "--seq-len", "--global-batch",
                 "--micro-batch", "--lr", "--min-lr", "--warmup", "--weight-decay", "--grad-clip", "--train-tokens", "--steps",
                 "--precision", "--offload", "--activation-checkpointing", "--save-every", "--eval-every", "--keep-last", "--seed",
                 "--max-bad-steps", "--peak-tflops", "--nproc-per-node", "--hostfile"):
        assert flag in r.output, flag


def test_shards_are_rehashed_only_when_their_files_change(tmp_path, korean_shards, monkeypatch):
    import os
    from types import SimpleNamespace

    import clova_train.shards.format
    from clova_train.training.rundir import VERIFIED_FILE
    from clova_train.training.run.preflight import check_inputs

    shards = tmp_path / "shards"
    shutil.copytree(korean_shards, shards)
    spec = SimpleNamespace(run_dir=tmp_path / "run", data=DataConfig(paths=[str(shards)]), reverify=False)
    check_inputs(spec)
    stamps = json.loads((tmp_path / "run" / VERIFIED_FILE).read_text())["shards"]
    assert len(stamps) == len(read_manifest(shards)["shards"])  # one stamp per shard, each file by real path
    assert all(st["bin"]["path"].startswith(str(shards.resolve())) and st["bin"]["blocks"] for st in stamps.values())

    def no_full_check(job):
        raise AssertionError(f"fully re-checked an unchanged shard {job[0]}")

    with monkeypatch.context() as m:
        m.setattr(clova_train.shards.format, "_check_one", no_full_check)
        check_inputs(spec)  # a restart: .idx re-hashed, a sample of .bin blocks read, nothing checked in full
        with pytest.raises(AssertionError, match="fully re-checked"):
            check_inputs(SimpleNamespace(**{**vars(spec), "reverify": True}))  # --reverify trusts no stamp
    # A flipped byte with the mtime put back: the block sample still finds it (these shards are one block each).
    binfile = next(p for p in sorted(shards.glob("*.bin")) if p.stat().st_size > 100)
    st = binfile.stat()
    raw = bytearray(binfile.read_bytes())
    raw[10] ^= 1
    binfile.write_bytes(bytes(raw))
    os.utime(binfile, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ClovaError, match="sha256 differs"):
        check_inputs(spec)


def test_the_first_stop_signal_is_the_reason_and_a_second_ctrl_c_interrupts():
    import signal

    from clova_train.training.trainer.step import StopSignal

    stop = StopSignal()
    stop._handle(signal.SIGUSR1, None)  # the time-limit warning ...
    stop._handle(signal.SIGTERM, None)  # ... then the SIGTERM of the requeue it asked for
    assert stop.name == "SIGUSR1"
    stop._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_parallel_dims_map_every_mode_and_refuse_bad_layouts_in_one_line():
    from clova_train.training.parallel.dims import ParallelDims

    zero3 = ParallelDims.from_config(ParallelConfig(mode="zero3"), 8)
    assert (zero3.dp, zero3.pp, zero3.tp, zero3.zero_stage, zero3.pipelined) == (8, 1, 1, 3, False)
    assert ParallelDims.from_config(ParallelConfig(mode="zero1"), 4).zero_stage == 1
    piped = ParallelDims.from_config(ParallelConfig(mode="pipeline", pipeline_stages=2), 8, zero_stage=1)
    assert (piped.dp, piped.pp, piped.pipelined) == (4, 2, True) and piped.world == 8
    # Megatron's order: stage slowest, tensor rank fastest; every rank of a replica reads the same share.
    assert [piped.coords(r) for r in (0, 3, 4, 7)] == [(0, 0, 0), (0, 3, 0), (1, 0, 0), (1, 3, 0)]
    assert piped.group_ranks("dp") == [[0, 1, 2, 3], [4, 5, 6, 7]] and piped.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [piped.data_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ClovaError, match="needs 8 ranks, not 6"):
        piped.check(6)
    with pytest.raises(ClovaError, match="ZeRO stage 0 or 1 only"):
        ParallelDims(dp=2, pp=2, zero_stage=3, pipelined=True)
    tp = ParallelDims.from_config(ParallelConfig(mode="pipeline", pipeline_stages=2, tensor_parallel=2), 8, zero_stage=1)
    assert (tp.dp, tp.pp, tp.tp) == (2, 2, 2) and tp.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [tp.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]  # both ranks of a tensor-parallel group read one share
    with pytest.raises(ClovaError, match="cannot form tensor-parallel groups of 3"):
        ParallelDims.from_config(ParallelConfig(tensor_parallel=3), 8)


def test_wrong_tensor_parallel_layouts_are_one_line_each():
    import torch

    from clova_train.model.config import ModelConfig
    from clova_train.training.parallel.dims import ParallelDims
    from clova_train.training.parallel.tensor import check_tensor_parallel, shard, unshard

    tiny = ModelConfig.from_name("tiny", vocab_size=256)  # 4 heads
    dims = ParallelDims.from_config(ParallelConfig(tensor_parallel=8), 8)
    with pytest.raises(ClovaError, match="4 attention heads do not divide into 8 ranks"):
        check_tensor_parallel(tiny, dims, ranks_per_node=8)
    with pytest.raises(ClovaError, match="--tensor-parallel 4 with 2 rank.s. per node would put a tensor-parallel group across nodes"):
        check_tensor_parallel(tiny, ParallelDims.from_config(ParallelConfig(tensor_parallel=4), 8), ranks_per_node=2)
    with pytest.raises(ClovaError, match="pipeline stages evenly"):
        ParallelConfig(mode="pipeline", pipeline_stages=3, tensor_parallel=2).stages(8)
    # The fused QKV is cut by heads: each rank's slice is [q_r; k_r; v_r], and unshard undoes it.
    qkv = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(24, 2)
    slices = [shard("blocks.0.attn.qkv.weight", qkv, r, 2) for r in range(2)]
    assert torch.equal(slices[1][:4], qkv[4:8]) and torch.equal(slices[1][4:8], qkv[12:16])
    assert torch.equal(unshard("blocks.0.attn.qkv.weight", slices), qkv)
    row = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(unshard("blocks.3.mlp.proj.weight", [shard("blocks.3.mlp.proj.weight", row, r, 3) for r in range(3)]), row)
    assert shard("blocks.3.mlp.proj.bias", row, 1, 3) is row and shard("ln_f.weight", row, 1, 3) is row
