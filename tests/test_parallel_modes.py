"""ZeRO-1/2 beside ZeRO-3 and pipeline: same start, fp32 gradient sums under bf16, activation checkpointing, export, and what runs around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import GPT, num_params
from clova_train.model.loss import lm_loss
from clova_train.training.parallel.distributed import local_layout
from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config, template_defaults
from clova_train.training.run.config import TrainConfig
from clova_train.training.rundir import CONFIG_FILE, METRICS_FILE

from conftest import TRAIN_ARGS, clova_cli

REPO = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def short_run(run: Path, shards: Path, *extra, env=None, steps: int = 2):
    r = clova_cli("train", *TRAIN_ARGS, "--data", shards, "--out", run, "--nproc-per-node", "2", "--no-tensorboard",
                  "--steps", str(steps), *map(str, extra), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


# ---------------------------------------------------------------- units (no processes)


def test_launcher_environments_map_to_local_rank_world_and_device():
    # torchrun on an 8-GPU node
    assert local_layout({"LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}, 8, 16) == (5, 8, 5)
    # DeepSpeed's launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE
    assert local_layout({"LOCAL_RANK": "3", "LOCAL_SIZE": "4"}, 4, 8) == (3, 4, 3)
    # Slurm binding one GPU per task: every task sees one device 0
    assert local_layout({"SLURM_LOCALID": "6", "SLURM_NTASKS_PER_NODE": "8"}, 1, 64) == (6, 8, 0)
    assert local_layout({"LOCAL_RANK": "6", "SLURM_TASKS_PER_NODE": "8(x2),4"}, 2, 20) == (6, 8, 0)
    # nothing set: one node holds every rank
    assert local_layout({}, 0, 2) == (0, 2, 0)


def test_resolved_config_reduces_in_fp32_and_sizes_buckets_by_width():
    t = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    train = TrainConfig(steps=1, global_batch=16, micro_batch=1, lr=1e-3, precision="bf16")
    for mode, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3)):
        ds = deepspeed_config(t, train, ParallelConfig(mode=mode), world=2, cuda=True, tensorboard_dir=None, model=ModelConfig(n_embd=2048, n_head=16))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
        assert ds["zero_optimization"]["reduce_bucket_size"] == 2 * 12 * 2048**2  # two 1.3B blocks
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 12 * 2048**2
    wide = deepspeed_config(t, train, ParallelConfig(), world=2, cuda=True, tensorboard_dir=None, model=ModelConfig(n_embd=10240, n_head=80))["zero_optimization"]
    assert wide["reduce_bucket_size"] == wide["stage3_prefetch_bucket_size"] == 500_000_000  # 82B: DeepSpeed's cap
    fast = deepspeed_config(t, train, ParallelConfig(reduce_dtype="bf16"), world=2, cuda=True, tensorboard_dir=None, model=ModelConfig(n_embd=64, n_head=4))
    assert fast["data_types"] == {"grad_accum_dtype": "bf16"} and fast["communication_data_type"] == "bf16"
    with pytest.raises(ClovaError, match="--reduce-dtype fp16 under bf16"):
        deepspeed_config(t, train, ParallelConfig(reduce_dtype="fp16"), world=2, cuda=True, tensorboard_dir=None)
    pipe0 = {"zero_optimization": {"stage": 0}, "pipeline": {}}
    with pytest.raises(ClovaError, match="ZeRO stage 0 under bf16.*--reduce-dtype bf16"):
        deepspeed_config(pipe0, train, ParallelConfig(mode="pipeline"), world=2, cuda=True, tensorboard_dir=None)
    assert template_defaults({"zero_optimization": {"stage": 1}})[1] == {"mode": "zero1"}
    assert template_defaults({"zero_optimization": {"stage": 2}})[1] == {"mode": "zero2"}
    with pytest.raises(ClovaError, match="ZeRO-3 feature"):
        ParallelConfig(mode="zero2", offload="cpu")


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients():
    cfg = ModelConfig.from_name("tiny", vocab_size=2048, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    x, y = torch.randint(0, 2048, (3, 64)), torch.randint(0, 2048, (3, 64))
    chunked = model(x, y)  # 192 tokens in chunks of 1024 would be one chunk: force several
    from clova_train.model.loss import chunked_lm_loss

    h = model.ln_f(model.hidden(x))
    several = chunked_lm_loss(h, model.wte.weight, y, chunk_tokens=50)
    several.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = lm_loss(model.head(model.hidden(x)), y)
    full.backward()
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5) and several.item() == pytest.approx(full.item(), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_activation_checkpointing_keeps_less_for_backward():
    from clova_train.training.parallel.engine import checkpoint_blocks
    from clova_train.training.plan import activation_bytes

    from test_plan import _saved_activation_bytes

    cfg = ModelConfig(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=512)
    full = _saved_activation_bytes(cfg, 2)
    kept = _saved_activation_bytes(cfg, 2, prepare=checkpoint_blocks)
    print(f"saved activations, 4 x 128 tiny model, 2 x 128 tokens: {full / 2**20:.2f} MiB without, {kept / 2**20:.2f} MiB with checkpointing")
    assert kept < 0.5 * full
    planned = activation_bytes(cfg, 4, 2 * 128, 4, checkpointing=True, head=True) - 2 * 128 * 128 * 16 * 4  # no block recomputed yet
    assert kept == pytest.approx(planned, rel=0.35)


def test_compiled_blocks_train_like_eager_ones():
    from clova_train.training.parallel.engine import compile_blocks

    cfg = ModelConfig.from_name("tiny", vocab_size=512, block_size=32)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 512, (2, 33), generator=g)] * 3  # one batch thrice: its loss must fall
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights()
        if compiled:
            compile_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[compiled] = []
        for mb in data:
            loss = model(mb[:, :-1], mb[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[compiled].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]


def test_building_one_pipeline_stage_of_82b_allocates_only_its_layers():
    from deepspeed.runtime.utils import partition_balanced

    from clova_train.model.gpt import parts as model_parts
    from clova_train.training.parallel.pipeline import layer_param_counts

    from types import SimpleNamespace

    from deepspeed.pipe import PipelineModule

    from clova_train.training.parallel.pipeline import pipeline_layers

    tiny = ModelConfig.from_name("tiny", vocab_size=256, block_size=16)
    # DeepSpeed's own count builds every layer; ours, from the config, gives the same numbers.
    assert layer_param_counts(tiny) == PipelineModule._count_layer_params(SimpleNamespace(_layer_specs=pipeline_layers(tiny)))
    cfg = ModelConfig.from_name("82b")
    counts = layer_param_counts(cfg)  # meta-device builds: no memory
    plan = model_parts(cfg)
    assert len(counts) == len(plan) == cfg.n_layer + 4
    assert sum(counts) - counts[-1] == num_params(cfg)  # the tied head reuses the embedding
    parts = partition_balanced(weights=counts, num_parts=16)  # what PipelineModule does with these counts
    start, stop = parts[5], parts[6]
    # What rank 5 builds: only its layers, and they hold that stage's count and no more.
    owned = sum(counts[start:stop])
    with torch.device("meta"):  # ~5B parameters: shapes only
        built = [plan[i].module(cfg) for i in range(start, stop)]
    assert sum(p.numel() for m in built for p in m.parameters()) == owned
    assert owned < num_params(cfg) / 12


# ---------------------------------------------------------------- DeepSpeed for real


@pytest.mark.slow
def test_bf16_accumulation_in_fp32_is_closer_to_the_fp32_gradient():
    """16 micro-batches of bf16 on one rank under each ZeRO stage: the fp32-accumulated gradient is the more exact one."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "grad_accum_probe.py"), "zero1", "zero2", "zero3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6, proc.stdout[-2000:]
    for mode in ("zero1", "zero2", "zero3"):
        fp32, bf16 = (next(r for r in rows if r["mode"] == mode and r["reduce_dtype"] == d) for d in ("fp32", "bf16"))
        print(f"{mode}: relative gradient error vs fp32, bf16 weights: fp32 sums {fp32['rel_error']:.2e}, bf16 sums {bf16['rel_error']:.2e}")
        assert fp32["data_types"] == {"grad_accum_dtype": "fp32"} and fp32["communication_data_type"] == "fp32"
        # Both share the bf16 forward/backward error; the bf16 sums add theirs on top. (The global norm, a sum of
        # squares over 0.2M numbers, averages both away and tells them apart by chance only.)
        assert bf16["rel_error"] > 1.2 * fp32["rel_error"]


@pytest.mark.slow
def test_logged_grad_norm_is_torch_clip_grad_norm_of_the_same_gradients():
    """Six fp32 steps on one rank under ZeRO-1 and ZeRO-3, the norm crossing the clip: the logged grad_norm is the L2 norm
    of the whole averaged gradient before clipping, what clip_grad_norm_ returns on the gradients DeepSpeed steps with.
    DeepSpeed sums the squares in fp64 under ZeRO-3 (fp32 under ZeRO-1), so it sits on the fp64 norm; torch in fp32
    is off by a few 1e-6 relative, summation rounding."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "grad_accum_probe.py"), "norms", "zero1", "zero3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r["norms"] for r in map(json.loads, (line for line in proc.stdout.splitlines() if line.startswith("{")))}
    assert set(rows) == {"zero1", "zero3"}
    for mode, norms in rows.items():
        assert min(n for n, _, _ in norms) < 1.0 < max(n for n, _, _ in norms), norms  # clipped and unclipped steps
        assert len({round(n, 6) for n, _, _ in norms}) == len(norms)  # a fresh norm every step, not step 1's again
        for logged, torch32, torch64 in norms:
            assert abs(logged - torch64) / torch64 < 1e-6, (mode, logged, torch64)
            assert abs(logged - torch32) / torch32 < 2e-5, (mode, logged, torch32)


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory, korean_shards):
    """ZeRO-1 on 2 ranks with activation checkpointing; step 2 is NaN and due for a checkpoint."""
    run = tmp_path_factory.mktemp("zero1") / "run"
    r = short_run(run, korean_shards, "--parallel", "zero1", "--activation-checkpointing", "--save-every", "2", steps=4,
                  env={"CLOVA_FAULT": "nan_at_steps=2"})
    return run, r


def test_zero1_starts_like_zero3_and_a_skipped_step_is_never_saved(zero1_run, trained_run):
    run, r = zero1_run
    recs, ref = metrics(run), metrics(trained_run)
    assert recs[0]["samples"] == ref[0]["samples"] and recs[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-5)
    assert [x["skipped"] for x in recs] == [False, True, False, False]
    assert "step 2 was skipped" in r.stderr and "waits for the next good step" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert "optimizer: torch AdamW" in r.stderr
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["parallel"]["mode"] == "zero1" and cfg["deepspeed"]["zero_optimization"]["stage"] == 1
    assert cfg["deepspeed"]["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["deepspeed"]["communication_data_type"] == "fp32"
    assert cfg["deepspeed"]["zero_optimization"]["reduce_bucket_size"] == 2 * 12 * 64 * 64


@pytest.mark.parametrize("mode", ["zero1", "zero2"])
def test_zero12_export_logits_match_transformers(mode, zero1_run, korean_shards, tmp_path, tokenizer_dir, konlpy_lines, trained_run):
    """ZeRO-1 (fp32, above) and ZeRO-2 in bf16 (BF16 optimizer files): export reads the fp32 masters."""
    from transformers import GPT2LMHeadModel

    from clova_train.export.consolidate import consolidate_state_dict
    from clova_train.tokenizer.bpe import ClovaTokenizer

    if mode == "zero1":
        run = zero1_run[0]
    else:
        run = tmp_path / "run"
        short_run(run, korean_shards, "--parallel", "zero2", "--precision", "bf16", steps=2)
        assert metrics(run)[0]["loss"] == pytest.approx(metrics(trained_run)[0]["loss"], abs=0.02)  # bf16 forward
    out = tmp_path / "hf"
    r = clova_cli("export", run, "--out", out, "--dtype", "fp32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "clova_export.json").read_text())
    assert meta["parallel"] == mode and meta["weights_source"] == "fp32 master weights from the ZeRO-1/2 optimizer state"
    # The model-state file holds the training-precision weights, which DeepSpeed copies from the masters: an independent check.
    tag = sorted((run / "checkpoints").glob("step_*"))[-1]
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
    masters = consolidate_state_dict(run)
    assert set(masters) == set(module)
    for name, w in module.items():
        assert torch.equal(masters[name].to(w.dtype), w), name
    ours = GPT(ModelConfig(**json.loads((run / CONFIG_FILE).read_text())["model"])).eval()
    ours.load_state_dict(masters)
    ids = ClovaTokenizer.load(tokenizer_dir).encode(" ".join(konlpy_lines[:40]))
    probe = torch.tensor([ids[:64], ids[64:128]])
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (hf(probe).logits - ours(probe)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_pipeline_with_activation_checkpointing_trains_from_zero3s_start(tmp_path, korean_shards, trained_run):
    run = tmp_path / "run"
    # --warmup 1: step 1 updates with the reference run's learning rate, so step 2 compares too
    short_run(run, korean_shards, "--parallel", "pipeline", "--pipeline-stages", "2", "--activation-checkpointing", "--save-every", "2", "--warmup", "1")
    recs, ref = metrics(run), metrics(trained_run)
    assert recs[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert recs[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-4) and not any(x["skipped"] for x in recs)


def test_prefetched_stream_gives_the_same_batches_and_the_consumers_state():
    from clova_train.training.trainer.prefetch import Prefetcher

    from test_train_units import _streams

    plain, = _streams(1)
    ahead = Prefetcher(_streams(1)[0])
    try:
        for _ in range(4):
            want, got = plain.next_batch(), ahead.next_batch()
            assert all(torch.equal(a, b) for a, b in zip(want, got))
            # The thread has built the next batch already; the state is still the one after `got`.
            assert ahead.state_dict() == plain.state_dict() and ahead.position == plain.position
        resumed = Prefetcher(_streams(1)[0])
        resumed.load_state_dict(ahead.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), resumed.next_batch()))
        resumed.close()
    finally:
        ahead.close()


def test_optimizer_line_says_which_kernel_runs_and_how_to_get_fused_adam(tmp_path, monkeypatch):
    train = TrainConfig(steps=1, global_batch=8, micro_batch=1, lr=1e-3, precision="bf16")
    from clova_train.training.trainer.prefetch import optimizer_kernel

    cpu = deepspeed_config({}, train, ParallelConfig(), world=1, cuda=False, tensorboard_dir=None)
    assert optimizer_kernel(cpu, cuda=False) == "optimizer: torch AdamW"
    # A CUDA config on a machine where FusedAdam is neither pre-built nor compilable (this one: no nvcc).
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cuda = deepspeed_config({}, train, ParallelConfig(), world=1, cuda=True, tensorboard_dir=None)
    line = optimizer_kernel(cuda, cuda=True)
    assert line.startswith("optimizer: torch fused AdamW, because DeepSpeed FusedAdam cannot load: it is not pre-built")
    assert "DS_BUILD_FUSED_ADAM=1" in line and cuda["optimizer"]["params"]["torch_adam"] is True and cuda["optimizer"]["params"]["fused"] is True
    (tmp_path / "ext" / "fused_adam").mkdir(parents=True, exist_ok=True)  # the first look made the dir, not the lock
    (tmp_path / "ext" / "fused_adam" / "lock").write_text("")
    again = deepspeed_config({}, train, ParallelConfig(), world=1, cuda=True, tensorboard_dir=None)
    line = optimizer_kernel(again, cuda=True)
    assert "stale build lock" in line and "delete it" in line
