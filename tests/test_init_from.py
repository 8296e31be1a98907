"""`clova train --init-from HF_DIR`: tiny random Hugging Face models (built with transformers, no download) as sources.

Two real 2-rank runs at learning rate 0 (a Llama under ZeRO-3, a GPT-2 in two
pipeline stages) check that the weights arrive unchanged and that step 1's loss
is transformers' loss on the same batch; the README's continued pre-training
block, run in one process, checks grafting onto another tokenizer,
--freeze-except-embeddings, --schedule wsd, extending and exporting; the rest
are in-process.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.model.config import pad_vocab
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.training.run.config import TrainConfig, lr_at

from conftest import clova_cli

runner = CliRunner()
SEQ = 32
RUN_ARGS = ["--seq-len", SEQ, "--global-batch", 4, "--micro-batch", 2, "--steps", 1, "--lr", 0, "--warmup", 0,
            "--save-every", 1, "--eval-every", 0, "--no-tensorboard", "--precision", "fp32", "--nproc-per-node", 2]


def gpt2_dir(out: Path, vocab_size: int, seed: int, tokenizer_files: list[Path]) -> Path:
    """A random GPT2LMHeadModel saved with safetensors, dropout off; odd widths so ZeRO-3 pads its partitions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=45, n_layer=2, n_head=5, activation_function="gelu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random LayerNorms and biases, so a weight that is dropped or swapped shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("ln_1.weight") or "ln" in name and name.endswith("weight") else 0.0, 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_files:
        shutil.copyfile(f, out / f.name)
    return out


def llama_dir(out: Path, vocab_size: int, seed: int, tokenizer_files: list[Path]) -> Path:
    """A random LlamaForCausalLM (grouped-query attention, untied head) saved with safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)  # RMSNorm gains away from 1, so a norm that is not loaded shows
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_files:
        shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory, tokenizer_dir) -> Path:
    """A Llama checkpoint whose tokenizer is the run's own."""
    tok = ClovaTokenizer.load(tokenizer_dir)
    return llama_dir(tmp_path_factory.mktemp("src") / "llama-same", pad_vocab(tok.vocab_size), 2, [tokenizer_dir / "tokenizer.json"])


@pytest.fixture(scope="module")
def same_tok_source(tmp_path_factory, tokenizer_dir) -> Path:
    """A GPT-2 checkpoint whose tokenizer is the run's own (its tokenizer.json beside the weights)."""
    tok = ClovaTokenizer.load(tokenizer_dir)
    return gpt2_dir(tmp_path_factory.mktemp("src") / "gpt2-same", pad_vocab(tok.vocab_size), 0, [tokenizer_dir / "tokenizer.json"])


def train_foreign_tokenizer(out: Path, files: list[Path], kind: str) -> Path:
    """A plain BPE (no morphemes) trained on the same text, as a foreign base model has: byte-level (GPT-2, Llama 3)
    or SentencePiece-style with "▁" for spaces, prepended to the text as Llama 2's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "byte-level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "</s>"])
    tok.train([str(f) for f in files], trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def symbol_bytes(symbol: str, kind: str) -> bytes:
    """The test's own reading of a base symbol (transformers' copy of GPT-2's byte table, not ours)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if kind == "byte-level":
        table = {c: b for b, c in bytes_to_unicode().items()}
        return bytes(table[c] for c in symbol)
    return symbol.replace("\u2581", " ").encode()


@pytest.fixture(scope="module")
def foreign_tokenizer(tmp_path_factory, konlpy_files) -> Path:
    return train_foreign_tokenizer(tmp_path_factory.mktemp("foreign_tok") / "tokenizer.json", konlpy_files, "byte-level")


@pytest.fixture(scope="module")
def foreign_source(tmp_path_factory, foreign_tokenizer) -> Path:
    """A GPT-2 checkpoint trained (here: drawn) with the foreign tokenizer."""
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(foreign_tokenizer)).get_vocab_size()
    return gpt2_dir(tmp_path_factory.mktemp("src") / "gpt2-foreign", size, 1, [foreign_tokenizer])


@pytest.fixture(scope="module")
def foreign_llama(tmp_path_factory, foreign_tokenizer) -> Path:
    """A Llama checkpoint with the foreign tokenizer: its untied head is grafted too."""
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(foreign_tokenizer)).get_vocab_size()
    return llama_dir(tmp_path_factory.mktemp("src") / "llama-foreign", size, 3, [foreign_tokenizer])


def source_weights(src: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def step1_batch(run: Path) -> torch.Tensor:
    """The global batch of step 1, as the run's sampler drew it (the order does not depend on the rank count)."""
    from clova_train.training.data.sampler import DataConfig, TrainStream, prepare_indices

    cfg = json.loads((run / "config.json").read_text())
    data, train = DataConfig(**cfg["data"]), cfg["train"]
    datasets, _ = prepare_indices(data, train["seq_len"], train["seed"], train["global_batch"], build=False)
    stream = TrainStream(datasets, data.weights, global_batch=train["global_batch"], micro_batch=train["micro_batch"], rank=0, world=1)
    return torch.cat(stream.next_batch())


def hf_loss(src: Path, batch: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


# Two 2-rank runs in all, each mode once: Llama under ZeRO-3 (gathered module by module, untied head), GPT-2 in
# 2 pipeline stages (the embedding tied across the first and the last stage).
@pytest.fixture(scope="module", params=[("zero3", "llama_source"), ("pipeline", "same_tok_source")], ids=["zero3-llama", "pipeline-gpt2"])
def lr0_run(request, tmp_path_factory, korean_shards) -> dict:
    """One step at learning rate 0 from the source, on 2 ranks, exported in fp32 by `clova export`."""
    mode, source = request.param
    src = request.getfixturevalue(source)
    repo = Path(__file__).resolve().parents[1]
    d = tmp_path_factory.mktemp(mode)
    template = {"zero3": "zero3.json", "pipeline": "pipeline_zero1.json"}[mode]
    r = clova_cli("train", "--init-from", src, "--data", korean_shards, "--out", d / "run",
                  "--deepspeed", repo / "deepspeed_configs" / template, *RUN_ARGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    e = clova_cli("export", d / "run", "--out", d / "hf", "--dtype", "fp32", "--quiet")
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    return {"run": d / "run", "hf": d / "hf", "src": src, "output": r.stdout + r.stderr, "mode": mode}


def test_lr0_run_exports_the_source_bitwise_and_step1_loss_is_transformers(lr0_run):
    src, run = lr0_run["src"], lr0_run["run"]
    theirs, ours = source_weights(src), source_weights(lr0_run["hf"])
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k  # fp32 in, fp32 out: bitwise
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and metrics[0]["lr"] == 0
    assert metrics[0]["loss"] == pytest.approx(hf_loss(src, step1_batch(run)), abs=1e-5)
    # The run dir records the source, and says in its output where the weights came from.
    record = json.loads((run / "config.json").read_text())["init_from"]
    assert record["path"] == str(src.resolve()) and record["same_tokenizer"] and record["graft"] is None
    import hashlib

    assert record["config_sha256"] == hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    assert record["files"] == {"model.safetensors": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}
    assert record["fingerprint"]["model.safetensors"]["bytes"] == (src / "model.safetensors").stat().st_size
    assert f"weights from {src.resolve()}" in " ".join(lr0_run["output"].split())


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_grafted_rows_are_copies_or_means_of_the_base_pieces(kind, tmp_path, tokenizer_dir, konlpy_files):
    """Rows matched by the bytes a token stands for, whichever way each side spells them; copied rows equal the
    base's, averaged ones the mean of the base rows of pieces that spell the token (the base tokenizer's own
    encoding where it spells exactly those bytes)."""
    from tokenizers import Tokenizer

    from clova_train.training.initfrom.graft import BaseVocabulary, graft_rows, plan_graft

    tok = ClovaTokenizer.load(tokenizer_dir)
    base_dir = tmp_path / "base"
    train_foreign_tokenizer(base_dir / "tokenizer.json", konlpy_files, kind)
    base_tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    eos = base_tok.token_to_id("<|endoftext|>" if kind == "byte-level" else "</s>")
    plan = plan_graft(tok, BaseVocabulary(base_dir), base_eos=eos)
    base = torch.randn(base_tok.get_vocab_size(), 24, generator=torch.Generator().manual_seed(0))
    rows = graft_rows(plan, base, pad_vocab(tok.vocab_size), base_tok.get_vocab_size())
    spelled = lambda ids: b"".join(symbol_bytes(base_tok.id_to_token(i), kind) for i in ids)  # noqa: E731
    assert len(plan.copied) > 200 and len(plan.averaged) > 200  # both kinds really occur on this pair
    assert len(plan.copied) + len(plan.averaged) + len(plan.mean) == tok.vocab_size
    assert plan.copied[tok.eod_id] == eos  # by string (byte-level: GPT-2's own) or as the base's eos_token_id
    for ours, theirs in plan.copied.items():
        assert torch.equal(rows[ours], base[theirs])
        if ours != tok.eod_id:
            assert spelled([theirs]) == tok.token_bytes(ours)  # " 대한" is "Ġ..." on one side and "▁대한" on the other
    exact = 0
    for ours, pieces in plan.averaged.items():
        assert torch.equal(rows[ours], base[pieces].mean(dim=0))
        assert len(pieces) >= 2 and spelled(pieces) == tok.token_bytes(ours)
        text = tok.token_bytes(ours).decode("utf-8", "replace")
        own = base_tok.encode(text, add_special_tokens=False).ids
        if "\ufffd" not in text and spelled(own) == tok.token_bytes(ours):
            assert pieces == own
            exact += 1
    assert exact > 100
    mean = base.mean(dim=0)
    for ours in [*plan.mean, *range(tok.vocab_size, rows.shape[0])]:
        assert torch.allclose(rows[ours], mean)


# The README's "Continued pre-training" block, run as written but for the sizes: the base is a tiny random Llama
# with a foreign tokenizer instead of a download, the shards and tokenizer are the suite's, the lengths are steps.
README_SMALL = {
    ("--train-tokens", "20e9"): ["--steps", "2", "--global-batch", "2", "--micro-batch", "2", "--save-every", "1", "--eval-every", "0",
                                 "--no-tensorboard", "--precision", "fp32", "--parallel", "zero1"],
    ("--seq-len", "4096"): ["--seq-len", str(SEQ)],
    ("--lr", "3e-5"): ["--lr", "1e-2"],
    ("--warmup", "500"): ["--warmup", "0"],
    ("--freeze-except-embeddings", "2000"): ["--freeze-except-embeddings", "1"],
    ("--keep-every", "1000"): ["--keep-every", "1"],
    ("--nproc-per-node", "8"): ["--nproc-per-node", "1"],
    ("--resume-step", "3000"): ["--resume-step", "1"],
    ("--train-tokens", "40e9"): ["--steps", "3"],
}


def readme_init_commands() -> list[list[str]]:
    """The `clova train` and `clova export` lines of the README's continued pre-training block, sizes made small."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Continued pre-training", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] not in (["clova", "train"], ["clova", "export"]):
            continue  # the download, and the tokenizer and shards the suite already has
        small, i = [], 1
        while i < len(argv):
            swap = README_SMALL.get(tuple(argv[i : i + 2]))
            small += swap if swap else [argv[i]]
            i += 2 if swap else 1
        out.append(small)
    return out


def test_readme_continued_pretraining_grafts_freezes_extends_and_exports(foreign_llama, korean_shards, tokenizer_dir, tmp_path):
    """One process, zero1, a Llama base with another tokenizer: its embedding and untied head are grafted (the counts
    printed); step 1 trains only their rebuilt rows, step 2 everything; the run branches from step 1 to a longer
    length, and exports as an ordinary LlamaForCausalLM."""
    from clova_train.export.consolidate import consolidate_state_dict
    from clova_train.training.initfrom.graft import BaseVocabulary, describe_counts, graft_rows, plan_graft

    train, extend, export = readme_init_commands()
    base = shutil.copytree(foreign_llama, tmp_path / "base" / "llama3-8b")  # rewritten at the end
    (tmp_path / "shards").symlink_to(korean_shards)
    run = tmp_path / "runs" / "ko-llama3"
    r = clova_cli(*train, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tok = ClovaTokenizer.load(tokenizer_dir)
    plan = plan_graft(tok, BaseVocabulary(base), base_eos=0)
    rows = pad_vocab(tok.vocab_size)
    assert describe_counts(plan.counts(rows)) in " ".join((r.stdout + r.stderr).split())
    assert json.loads((run / "config.json").read_text())["init_from"]["graft"] == plan.counts(rows)
    src = source_weights(base)
    step1 = consolidate_state_dict(run, tag="step_00000001")
    step2 = consolidate_state_dict(run, tag="step_00000002")
    new = torch.tensor(plan.new_rows(rows))
    old = torch.tensor(sorted(plan.copied))
    for ours, theirs in (("wte.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")):
        start = graft_rows(plan, src[theirs], rows, 700)
        assert torch.equal(step1[ours][old], start[old]), ours  # copied rows frozen
        assert not torch.equal(step1[ours][new], start[new]), ours  # rebuilt rows trained
        assert not torch.equal(step2[ours][old], start[old]), ours  # and then everything
    assert torch.equal(step1["blocks.0.attn.q.weight"], src["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(step1["ln_f.weight"], src["model.norm.weight"])
    assert not torch.equal(step2["blocks.0.attn.q.weight"], step1["blocks.0.attn.q.weight"])
    # Extended from step 1 by --resume (config.json's init_from section): the checkpoint continues, no source is read.
    again = clova_cli(*extend, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    said = " ".join((again.stdout + again.stderr).split())
    assert "resuming from step_00000001" in said and "weights from" not in said
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    e = clova_cli(*export, cwd=tmp_path)
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "ko-llama3" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # A source rewritten since the run started is named, not silently taken for the one recorded.
    from safetensors.torch import save_file

    save_file(load_file(str(base / "model.safetensors")), str(base / "model.safetensors"), metadata={"format": "pt", "v": "2"})
    _one_line(runner.invoke(app, ["train", "--out", str(run), "--resume", "--steps", "4"]), "model.safetensors changed since")


def _one_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    msg = " ".join(result.output.split())
    for f in fragments:
        assert f in msg, msg
    return msg


class Bomb:
    """Unpickling this creates a file: the proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_source_is_refused_in_one_line_unopened(tmp_path, korean_shards, same_tok_source):
    src = tmp_path / "bin-model"
    src.mkdir()
    shutil.copyfile(same_tok_source / "config.json", src / "config.json")
    marker = tmp_path / "pickle-was-opened"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb(marker)))
    r = runner.invoke(app, ["train", "--init-from", str(src), "--data", str(korean_shards), "--out", str(tmp_path / "run"), "--steps", "1"])
    _one_line(r, "pytorch_model.bin", "pickle", "safetensors")
    assert not marker.exists()
    pickle.loads((src / "pytorch_model.bin").read_bytes())
    assert marker.exists()  # what opening it would have done


def test_init_from_refuses_a_second_shape_and_a_mismatched_checkpoint(tmp_path, korean_shards, same_tok_source):
    args = ["train", "--data", str(korean_shards), "--out", str(tmp_path / "run"), "--steps", "1"]
    _one_line(runner.invoke(app, [*args, "--init-from", str(same_tok_source), "--model", "tiny"]), "--model and --init-from")
    _one_line(runner.invoke(app, [*args, "--init-from", str(same_tok_source), "--arch", "llama"]), "--arch 'llama'", "gpt3")
    bad = tmp_path / "bad"
    shutil.copytree(same_tok_source, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    _one_line(runner.invoke(app, [*args, "--init-from", str(bad)]), "transformer.h.2.", "config.json")
    (bad / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    _one_line(runner.invoke(app, [*args, "--init-from", str(bad)]), "activation_function")
    _one_line(runner.invoke(app, [*args, "--init-from", str(same_tok_source), "--freeze-except-embeddings", "2"]), "--freeze-except-embeddings")


def test_sharded_base_only_and_damaged_sources(tmp_path, same_tok_source, tokenizer_dir, korean_shards):
    """A sharded checkpoint (index + files) and one of GPT2Model alone (names without "transformer.") read as the
    single-file GPT2LMHeadModel does; a damaged safetensors file is one line."""
    from transformers import GPT2LMHeadModel

    from clova_train.training.initfrom.loader import InitFrom
    from clova_train.training.initfrom.prepare import prepare_source

    tok = ClovaTokenizer.load(tokenizer_dir)
    model = GPT2LMHeadModel.from_pretrained(str(same_tok_source))
    model.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="20KB")
    model.transformer.save_pretrained(str(tmp_path / "base-only"), safe_serialization=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, info = prepare_source(same_tok_source, tok)
    want = InitFrom(info, cfg, tokenizer_dir)
    for name in ("sharded", "base-only"):
        shutil.copyfile(same_tok_source / "tokenizer.json", tmp_path / name / "tokenizer.json")
        cfg2, info2 = prepare_source(tmp_path / name, tok)
        assert cfg2.identity() | {"name": ""} == cfg.identity() | {"name": ""} and info2["same_tokenizer"]
        got = InitFrom(info2, cfg2, tokenizer_dir)
        assert all(torch.equal(got.tensor(n), want.tensor(n)) for n in want.shapes)
    assert len(prepare_source(tmp_path / "sharded", tok)[1]["fingerprint"]) > 1
    bad = tmp_path / "damaged"
    shutil.copytree(same_tok_source, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    args = ["train", "--data", str(korean_shards), "--out", str(tmp_path / "run"), "--steps", "1", "--init-from", str(bad)]
    _one_line(runner.invoke(app, args), "model.safetensors", "not a readable safetensors file")


def test_schedules_constant_cosine_and_wsd():
    base = dict(seq_len=8, global_batch=4, steps=100, lr=1e-3, min_lr=1e-4, warmup=10)
    const = TrainConfig(**base, schedule="constant")
    assert [lr_at(s, const) for s in (5, 10, 11, 100)] == [5e-4, 1e-3, 1e-3, 1e-3]
    wsd = TrainConfig(**base, schedule="wsd", decay_fraction=0.2)
    assert lr_at(5, wsd) == pytest.approx(5e-4)
    assert all(lr_at(s, wsd) == 1e-3 for s in range(10, 81))  # stable until the last 20 steps
    assert lr_at(90, wsd) == pytest.approx(1e-3 - 0.5 * 9e-4) and lr_at(100, wsd) == pytest.approx(1e-4)
    longer = TrainConfig(**{**base, "steps": 200}, schedule="wsd")  # the run extended: the decay moves with the end
    assert lr_at(100, longer) == 1e-3 and lr_at(200, longer) == pytest.approx(1e-4)
    cosine = TrainConfig(**base)
    assert lr_at(55, cosine) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + __import__("math").cos(__import__("math").pi * 0.5)))
    with pytest.raises(Exception, match="decay_tokens"):
        TrainConfig(**base, schedule="wsd", decay_tokens=100)
    with pytest.raises(Exception, match="schedule"):
        TrainConfig(**base, schedule="linear")
