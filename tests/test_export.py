"""`clova export`: real `clova train` runs (two gloo ranks; ZeRO-3 in bf16, pipeline in fp32 and bf16) to Hugging Face directories and back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.export.consolidate import consolidate_state_dict, expected_shapes, open_checkpoint, resolve_checkpoint
from clova_train.core.errors import ClovaError
from clova_train.model.adapter import HF_KEY_MAP, from_hf, to_hf
from clova_train.export.weights import SafetensorsWriter, _Entry, parse_size, plan_shards
from clova_train.export.hf import export_hf, load_for_inference
from clova_train.model.gpt import GPT
from clova_train.model.config import ModelConfig
from clova_train.training.parallel.pipeline import pipeline_layer_names
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.training.rundir import MARKER_FILE

from conftest import clova_cli

runner = CliRunner()
STEPS = 3
# n_embd 45 makes LayerNorm and bias sizes odd, so ZeRO-3 pads their partitions across the two ranks.
MODEL = {"name": "tiny", "n_layer": 2, "n_embd": 45, "n_head": 5, "block_size": 64}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def clova_subprocess(*args) -> None:
    exe = Path(sys.executable).with_name("clova")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"clova {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    msg = " ".join(result.output.split())  # rich may wrap the one line on a narrow terminal
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in msg, msg
    return msg


# ---------------------------------------------------------------- fixtures: one real run, one export


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tokenizer_dir, konlpy_files) -> Path:
    """`clova tokenize` + `clova train`: 3 ZeRO-3 steps on two CPU ranks in bf16 (fp32 masters in the optimizer)."""
    d = tmp_path_factory.mktemp("zero3")
    clova_subprocess("tokenize", *konlpy_files, "--tokenizer", tokenizer_dir, "--out", d / "shards", "-q")
    (d / "model.json").write_text(json.dumps({"model": MODEL}))
    clova_subprocess(
        "train", "--config", d / "model.json", "--data", d / "shards", "--out", d / "run", "--steps", STEPS,
        "--seq-len", 64, "--global-batch", 4, "--micro-batch", 2, "--nproc-per-node", 2, "--precision", "bf16", "--parallel", "zero3",
    )  # fmt: skip
    return d / "run"


@pytest.fixture(scope="module")
def reference(zero3_run, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same checkpoint through DeepSpeed's own zero_to_fp32 (in a child: it loads everything)."""
    out = tmp_path_factory.mktemp("ref") / "reference.pt"
    code = (
        "import sys, torch\n"
        "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as get\n"
        "torch.save(get(sys.argv[1]), sys.argv[2])\n"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(zero3_run / "checkpoints"), str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def cfg(zero3_run) -> ModelConfig:
    return ModelConfig(**json.loads((zero3_run / "config.json").read_text())["model"])


@pytest.fixture(scope="module")
def hf_dir(zero3_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    r = cli("export", zero3_run, "--out", out, "--dtype", "fp32", "--quiet")
    assert r.exit_code == 0, r.output
    assert "verified" in r.output
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()


@pytest.fixture(scope="module")
def ours(cfg, reference) -> GPT:
    model = GPT(cfg).eval()
    model.load_state_dict(reference)
    return model


@pytest.fixture(scope="module")
def probe(tokenizer_dir, konlpy_lines) -> torch.Tensor:
    tok = ClovaTokenizer.load(tokenizer_dir)
    ids = tok.encode(" ".join(konlpy_lines[:40]))
    return torch.tensor([ids[:64], ids[64:128]])


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def tag_dir(run: Path) -> Path:
    return run / "checkpoints" / f"step_{STEPS:08d}"


# ---------------------------------------------------------------- the key map and the writer


def test_key_map_covers_gpt_and_matches_gpt2_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ModelConfig.from_name("tiny", vocab_size=256, block_size=32)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = {k: tuple(s) for k, s in expected_shapes(cfg).items()}
    mapped = dict(to_hf(k, torch.empty(s, device="meta")) for k, s in ours.items())
    assert {k: tuple(t.shape) for k, t in mapped.items()} == hf_shapes
    for k, s in ours.items():
        name, t = to_hf(k, torch.arange(torch.Size(s).numel()).view(s))
        back, t2 = from_hf(name, t)
        assert back == k and torch.equal(t2, torch.arange(torch.Size(s).numel()).view(s))
    assert len(HF_KEY_MAP) == 16


def test_streaming_writer_and_shard_plan(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7), "c": torch.randn(2, 2)}
    entries = [_Entry(k, tuple(t.shape), t.numel() * 2) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, torch.bfloat16) as w:
        for k, t in tensors.items():
            w.write(k, t)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t.to(torch.bfloat16))
    assert [[e.name for e in s] for s in plan_shards(entries, 30)] == [["a"], ["b", "c"]]
    assert [[e.name for e in s] for s in plan_shards(entries, 10)] == [["a"], ["b"], ["c"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100kb") == 100_000
    with pytest.raises(ClovaError, match="not a size"):
        parse_size("five")


# ---------------------------------------------------------------- ZeRO-3 export: weights, logits, generate


def test_consolidation_matches_zero_to_fp32_and_uses_fp32_masters(zero3_run, reference):
    sd = consolidate_state_dict(zero3_run)
    assert list(sd) == list(reference)  # our names, in the optimizer's order (decayed group first)
    assert {k: t.shape for k, t in sd.items()} == expected_shapes(ModelConfig(**MODEL, vocab_size=2048))
    for k in reference:
        assert torch.equal(sd[k], reference[k]), k
    # bf16 training: weights that bf16 cannot represent can only be the optimizer's fp32 masters.
    assert all(not torch.equal(t, t.bfloat16().float()) for t in sd.values())


def test_export_directory_describes_itself(hf_dir, zero3_run, tokenizer_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {
        "config.json", "generation_config.json", "model.safetensors", "README.md", "clova_export.json",
        "tokenizer.json", "tokenizer_config.json", "tokenization_clova.py", "clova_tokenizer.json",
    } <= names  # fmt: skip
    assert "model.safetensors.index.json" not in names
    assert not [p for p in hf_dir.parent.iterdir() if ".tmp-" in p.name]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (2, 45, 5, 64)
    assert (hf_dir / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    meta = json.loads((hf_dir / "clova_export.json").read_text())
    marker = json.loads((tag_dir(zero3_run) / "clova_checkpoint.json").read_text())
    assert meta["step"] == STEPS and meta["tokens"] == marker["tokens"] and meta["verified"]["max_abs_diff"] <= 1e-4
    card = (hf_dir / "README.md").read_text()
    for needle in (f"{marker['tokens']:,}", f"train {marker['loss']:.4f}", "trust_remote_code=True",
                   "Without `trust_remote_code=True`", "different ids", '"zero3"', "fp32 master weights"):  # fmt: skip
        assert needle in card, needle


def test_logits_match_transformers(hf_model, ours, probe):
    with torch.no_grad():
        diff = (hf_model(probe).logits - ours(probe)).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generate_matches_our_model(hf_model, ours, probe):
    prompt = probe[:1, :12]
    with torch.no_grad():
        hf_out = hf_model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=1)
        ids = prompt
        for _ in range(16):
            ids = torch.cat([ids, ours(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    # Our loop never stops; transformers stops early only if it picks end-of-document.
    assert hf_out.shape[1] > prompt.shape[1]
    assert hf_out.tolist() == ids[:, : hf_out.shape[1]].tolist()


def test_tokenizer_ids_through_autotokenizer_on_real_text(hf_dir, tokenizer_dir, konlpy_lines):
    from transformers import AutoTokenizer

    tok = ClovaTokenizer.load(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    ids = tok.encode_batch(konlpy_lines)
    assert hf(konlpy_lines)["input_ids"] == ids
    assert [hf.decode(i) for i in ids] == [tok.normalize(t) for t in konlpy_lines]
    # What the model card says about loading without trust_remote_code: plain byte-level BPE, other ids.
    plain = AutoTokenizer.from_pretrained(str(hf_dir))
    assert type(plain).__name__ != "ClovaTokenizerFast"
    assert plain(konlpy_lines)["input_ids"] != ids
    assert plain.decode(ids[0]) == tok.decode(ids[0])


def test_load_for_inference_from_hf_dir_and_run_dir(hf_dir, zero3_run, ours, probe, tokenizer_dir):
    want = ours(probe)
    for path in (hf_dir, zero3_run):
        model, tok = load_for_inference(path)
        assert isinstance(model, GPT) and not model.training
        assert isinstance(tok, ClovaTokenizer) and tok.hash == ClovaTokenizer.load(tokenizer_dir).hash
        with torch.no_grad():
            assert torch.equal(model(probe), want)


def test_sharded_bf16_export_loads(zero3_run, tmp_path, ours, probe):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    r = cli("export", zero3_run, "--out", out, "--dtype", "bf16", "--max-shard-size", "60KB", "--step", STEPS, "-q")
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).stat().st_size <= 60_000 + 4096 for f in files[1:])
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        want = ours(probe)
        assert (hf(probe).logits.float() - want).abs().max().item() <= 5e-2 * max(1.0, want.abs().max().item())
    model, _ = load_for_inference(out)
    assert torch.equal(model.wte.weight, ours.wte.weight.to(torch.bfloat16).float())


def test_no_verify_says_so(zero3_run, tmp_path):
    r = cli("export", zero3_run, "--out", tmp_path / "nv", "--dtype", "fp16", "--no-verify", "-q")
    assert r.exit_code == 0, r.output
    assert "not verified (--no-verify)" in " ".join(r.output.split())
    assert "Not verified at export" in (tmp_path / "nv" / "README.md").read_text()


# ---------------------------------------------------------------- pipeline export: the same path, another reader


def deepspeed_layer_files(run: Path, tag: str) -> dict[str, torch.Tensor]:
    """What DeepSpeed's PipelineModule wrote for each layer (layer_XX-model_states.pt), under our names."""
    cfg = ModelConfig(**json.loads((run / "config.json").read_text())["model"])
    sd = {}
    for i, own in enumerate(pipeline_layer_names(cfg)):
        if own:
            layer = torch.load(run / "checkpoints" / tag / f"layer_{i:02d}-model_states.pt")
            sd.update({ours: layer[key] for key, ours in own.items()})
    return sd


@pytest.fixture(scope="module")
def replicas_run(tmp_path_factory, korean_shards) -> Path:
    """Pipeline mode with 1 stage x 2 replicas in bf16: ZeRO-1 splits each fp32 master across the replicas' files."""
    d = tmp_path_factory.mktemp("replicas")
    (d / "model.json").write_text(json.dumps({"model": MODEL}))
    r = clova_cli(
        "train", "--config", d / "model.json", "--data", korean_shards, "--out", d / "run", "--steps", STEPS, "--seq-len", 64,
        "--global-batch", 4, "--micro-batch", 2, "--nproc-per-node", 2, "--precision", "bf16", "--parallel", "pipeline",
        "--pipeline-stages", 1, "--eval-every", 0, "--no-tensorboard", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d / "run"


def test_pipeline_consolidation_reads_fp32_masters_equal_to_deepspeeds_layer_files(pipeline_run, replicas_run):
    # Two stages, fp32: the masters of both stages' optimizer files are bit for bit what the layers hold.
    run = pipeline_run["run"]
    ckpt = open_checkpoint(resolve_checkpoint(run))
    assert ckpt.source.startswith("fp32 master weights from the ZeRO-1 optimizer state")
    ckpt.close()
    sd, wrote = consolidate_state_dict(run), deepspeed_layer_files(run, "step_00000016")
    assert list(sd) == list(expected_shapes(ModelConfig(**json.loads((run / "config.json").read_text())["model"])))
    assert set(wrote) == set(sd)
    for k in sd:
        assert torch.equal(sd[k], wrote[k]), k
    # bf16, each master split between two replicas' files (odd sizes: pieces straddle the cut): the layers hold
    # the masters rounded to bf16, and nothing bf16 can represent is what the export reads.
    sd, wrote = consolidate_state_dict(replicas_run), deepspeed_layer_files(replicas_run, f"step_{STEPS:08d}")
    assert set(wrote) == set(sd) == set(expected_shapes(ModelConfig(**MODEL, vocab_size=2048)))
    for k in sd:
        assert wrote[k].dtype == torch.bfloat16 and torch.equal(sd[k].bfloat16(), wrote[k]), k
        assert not torch.equal(sd[k], wrote[k].float()), k


def test_pipeline_export_logits_match_transformers(pipeline_run, tmp_path, probe):
    from transformers import GPT2LMHeadModel

    from clova_train.training.data.sampler import eval_batches, open_valid_data

    run = pipeline_run["run"]
    out = tmp_path / "hf"
    r = cli("export", run, "--out", out, "--dtype", "fp32", "--quiet")
    assert r.exit_code == 0, r.output
    assert "verified" in r.output
    meta = json.loads((out / "clova_export.json").read_text())
    assert meta["parallel"] == "pipeline" and meta["weights_source"].startswith("fp32 master weights")
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    cfg = json.loads((run / "config.json").read_text())
    ours = GPT(ModelConfig(**cfg["model"])).eval()
    ours.load_state_dict(deepspeed_layer_files(run, "step_00000016"))
    with torch.no_grad():
        assert (hf(probe).logits - ours(probe)).abs().max().item() <= 1e-4
        # The exported model scores the validation windows as the pipeline engine did at step 16, which a
        # misplaced layer, a missed transpose or a wrong stage's copy would not.
        windows = eval_batches(open_valid_data(cfg["data"]["paths"], cfg["train"]["seq_len"]), cfg["train"]["eval_samples"],
                               micro_batch=cfg["train"]["micro_batch"], rank=0, world=1)
        losses = [torch.nn.functional.cross_entropy(hf(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten()).item() for w in windows]
    valid_loss = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["valid_loss"]
    assert sum(losses) / len(losses) == pytest.approx(valid_loss, rel=1e-5)
    model, _ = load_for_inference(run)
    with torch.no_grad():
        assert torch.equal(model(probe), ours(probe))


def test_pipeline_checkpoint_falls_back_to_layer_files_and_names_what_is_missing(pipeline_run, tmp_path):
    run = copy_run(pipeline_run["run"], tmp_path)
    tag = run / "checkpoints" / "step_00000016"
    stage1 = next(tag.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt"))
    moved = stage1.rename(tmp_path / stage1.name)
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "partial checkpoint", "stage 1 are missing")
    assert_nothing_written(out)
    # No optimizer state at all (as ZeRO-0 in fp32 saves): the layer files are the weights.
    moved.unlink()
    for f in tag.glob("*optim_states.pt"):
        f.unlink()
    ckpt = open_checkpoint(resolve_checkpoint(run))
    assert ckpt.source == "model weights from the pipeline layer files (float32)"
    ckpt.close()
    sd, wrote = consolidate_state_dict(run), deepspeed_layer_files(run, "step_00000016")
    assert set(sd) == set(wrote)
    assert all(torch.equal(sd[k], wrote[k]) for k in sd)
    layer = tag / "layer_02-model_states.pt"
    layer.rename(tmp_path / layer.name)
    one_line_error(cli("export", run, "--out", out), "partial checkpoint", "layer_02-model_states.pt missing")
    (tmp_path / layer.name).rename(layer)
    claim_layers(run, 3)
    one_line_error(cli("export", run, "--out", out), "checkpoint does not match", "missing blocks.2")


def test_zero3_checkpoint_under_a_pipeline_config_is_a_clear_error(zero3_run, tmp_path):
    run = copy_run(zero3_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["parallel"]["mode"] = "pipeline"
    (run / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("export", run, "--out", tmp_path / "o"), "no pipeline layer files", "is config.json's 'parallel' right?")


# ---------------------------------------------------------------- bad input: one line, nothing half-written


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_run_dir_without_checkpoints(zero3_run, tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    shutil.copy(zero3_run / "config.json", run)
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "has no checkpoints", "clova train")
    assert_nothing_written(out)
    one_line_error(cli("export", tmp_path / "nope", "--out", out), "no such run directory")


def test_partial_checkpoint_missing_rank_file(zero3_run, tmp_path):
    run = copy_run(zero3_run, tmp_path)
    next(tag_dir(run).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "partial checkpoint", "rank(s) 1 of 2 are missing")
    assert_nothing_written(out)


def test_unfinished_checkpoint_without_marker(zero3_run, tmp_path):
    run = copy_run(zero3_run, tmp_path)
    (tag_dir(run) / "clova_checkpoint.json").unlink()
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "no complete checkpoint", "resume training")
    assert_nothing_written(out)


def claim_layers(run: Path, n: int) -> None:
    """Make the run dir's records (config.json and every checkpoint's marker, which export reads first) claim ``n`` layers."""
    for path in [run / "config.json", *run.glob(f"checkpoints/step_*/{MARKER_FILE}")]:
        rec = json.loads(path.read_text())
        if "model" in rec:
            rec["model"]["n_layer"] = n
            path.write_text(json.dumps(rec))


def test_truncated_rank_file(zero3_run, tmp_path):
    run = copy_run(zero3_run, tmp_path)
    f = next(tag_dir(run).glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "is damaged", "the completion marker recorded", "no older checkpoint is intact")
    assert_nothing_written(out)


def test_checkpoint_config_mismatch(zero3_run, tmp_path):
    run = copy_run(zero3_run, tmp_path)
    claim_layers(run, 3)
    out = tmp_path / "o"
    one_line_error(cli("export", run, "--out", out), "checkpoint does not match", "missing blocks.2", "run dir whose training")
    assert_nothing_written(out)


def test_unknown_step_lists_the_complete_ones(zero3_run, tmp_path):
    one_line_error(cli("export", zero3_run, "--out", tmp_path / "o", "--step", "7"), "no complete checkpoint at step 7", f"complete steps: {STEPS}")
    one_line_error(cli("export", zero3_run, "--out", tmp_path / "o", "--step", "last"), "--step must be a step number or 'latest'")
    one_line_error(cli("export", zero3_run, "--out", tmp_path / "o", "--dtype", "int8"), "--dtype must be one of")


def test_tokenizer_that_changed_since_training(zero3_run, tmp_path, konlpy_files):
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer(konlpy_files[:2], other, TokenizerConfig(vocab_size=600), show_progress=False)
    out = tmp_path / "o"
    one_line_error(cli("export", zero3_run, "--out", out, "--tokenizer", other), "is not the one the run trained with")
    assert_nothing_written(out)


def test_help_names_every_option():
    r = cli("export", "--help")
    assert r.exit_code == 0
    for opt in ("--out", "--step", "--dtype", "--max-shard-size", "--no-verify", "--overwrite", "--tokenizer"):
        assert opt in r.output, opt


def test_a_killed_exports_temporary_dir_is_cleared(zero3_run, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.tmp-{dead.pid}"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    r = cli("export", zero3_run, "--out", tmp_path / "o", "--no-verify", "-q")
    assert r.exit_code == 0, r.output
    assert not stale.exists()


def test_existing_destination_needs_overwrite(zero3_run, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    one_line_error(cli("export", zero3_run, "--out", out), "already exists", "--overwrite")
    assert (out / "old.txt").read_text() == "keep me"
    r = cli("export", zero3_run, "--out", out, "--overwrite", "--no-verify", "-q")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_verification_leaves_old_export_and_no_temp(zero3_run, tmp_path, monkeypatch):
    import clova_train.export.hf as export

    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("keep me")

    def broken(*a, **k):
        raise ClovaError("export check failed: simulated")

    monkeypatch.setattr(export, "verify_export", broken)
    with pytest.raises(ClovaError, match="simulated"):
        export_hf(zero3_run, out, export.ExportConfig(dtype="fp32", overwrite=True))
    assert (out / "old.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_zero_stage_reads_back_however_python_pickled_the_enum():
    # Python 3.11.0-3.11.4 pickle enum members by name (getattr(ZeroStageEnum, "weights"),
    # with protocol 2's "__builtin__" module); later versions by value. Checkpoints of both must read.
    import io
    import pickle

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from clova_train.core.safe_pickle import SafeUnpickler
    from clova_train.training.checkpoints.torchzip import _zero_stage

    by_name = (
        b"\x80\x02}q\x00X\n\x00\x00\x00zero_stageq\x01c__builtin__\ngetattr\nq\x02"
        b"cdeepspeed.runtime.zero.config\nZeroStageEnum\nq\x03X\x07\x00\x00\x00weightsq\x04\x86q\x05Rq\x06s."
    )
    assert pickle.loads(by_name)["zero_stage"] == ZeroStageEnum.weights  # the bytes are a real pickle
    by_value = pickle.dumps({"zero_stage": ZeroStageEnum.weights}, protocol=2)
    for data in (by_name, by_value):
        assert _zero_stage(SafeUnpickler(io.BytesIO(data)).load()["zero_stage"]) == 3
