"""Shared fixtures: the real Korean text shipped with konlpy and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest


def konlpy_corpus_dir() -> Path:
    import konlpy

    return Path(konlpy.__file__).parent / "data" / "corpus"


@pytest.fixture(scope="session")
def konlpy_files() -> list[Path]:
    """The constitution and the ten bills: about 140 KB of real Korean prose."""
    d = konlpy_corpus_dir()
    files = [d / "kolaw" / "constitution.txt", *sorted((d / "kobill").glob("*.txt"))]
    assert all(f.is_file() for f in files)
    return files


@pytest.fixture(scope="session")
def konlpy_lines(konlpy_files) -> list[str]:
    return [line.rstrip("\n") for f in konlpy_files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, konlpy_files) -> Path:
    """A morpheme-aware tokenizer trained on the real text (well under a second)."""
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(konlpy_files, out, TokenizerConfig(vocab_size=2000), show_progress=False)
    return out


# ---- generate / eval / ptune (issue 8) ------------------------------------
# A tiny GPT trained in-process on the real text, shared by test_generate,
# test_eval and test_ptune, and saved in the model.pt + config.json +
# tokenizer/ layout that `generate.load_model` reads besides export's dirs.
# Tiny matmuls run faster on one thread than on two cores shared with other
# test runs, hence `torch_one_thread`.


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tests with one torch thread; the previous count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer_dir, konlpy_files):
    """(model in eval mode, tokenizer): a 2-layer GPT after a few seconds of AdamW on the konlpy text."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    from clova_train.model.gpt import GPT
    from clova_train.model.config import ModelConfig, pad_vocab
    from clova_train.tokenizer.bpe import ClovaTokenizer

    tok = ClovaTokenizer.load(tokenizer_dir)
    # Whole files as documents: end-of-document is rare, so completions run on.
    docs = tok.encode_batch([f.read_text(encoding="utf-8") for f in konlpy_files])
    stream = torch.tensor([i for doc in docs for i in [*doc, tok.eod_id]])
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny", vocab_size=pad_vocab(tok.vocab_size), block_size=192))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    B, T = 8, 64
    for _ in range(120):
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen)
        x = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    torch.set_num_threads(threads)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_lm, tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny model on disk: model.pt (state dict), config.json (ModelConfig), tokenizer/."""
    import dataclasses
    import json
    import shutil

    import torch

    model, _ = tiny_lm
    out = tmp_path_factory.mktemp("tiny_lm")
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out


# ---- end generate / eval / ptune ------------------------------------------


# ---- train (issue 4) ------------------------------------------------------
# Real Korean shards, and one tiny ZeRO-3 run with two gloo processes that
# every test needing a trained run dir shares (about 15 s on two cores).

TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3",
    "--steps", "16", "--save-every", "4", "--eval-every", "4", "--eval-samples", "16", "--log-every", "4",
]


def clova_cli(*args, env: dict | None = None, timeout: float = 300, **popen):
    """Run `clova ARGS...` in a fresh interpreter (its own process group); CompletedProcess with text output."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", *map(str, args)]
    return subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, **popen
    )


@pytest.fixture(scope="session")
def korean_shards(tmp_path_factory, tokenizer_dir, konlpy_files) -> Path:
    """A shard dir of the konlpy text (about 27K train and 1K valid tokens)."""
    from clova_train.shards.format import ShardConfig
    from clova_train.shards.build import tokenize_corpus

    out = tmp_path_factory.mktemp("shards") / "ko"
    tokenize_corpus(konlpy_files, tokenizer_dir, out, ShardConfig(valid_fraction=0.05, workers=1), show_progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, korean_shards) -> Path:
    """RUN_DIR of `clova train` (tiny model, 16 steps, ZeRO-3 on 2 gloo ranks, deepspeed_configs/zero3.json)."""
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("train") / "run"
    r = clova_cli(
        "train", *TRAIN_ARGS, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", "--keep-last", "2",
        "--deepspeed", repo / "deepspeed_configs" / "zero3.json",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return run


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, korean_shards) -> dict:
    """The reference run's settings in pipeline mode: 2 stages on 2 gloo ranks, ZeRO-1, --partition type:Block,
    killed (-9) after step 10 and rerun to step 16. test_train checks the training, test_export the export.

    {"run": RUN_DIR, "args": the `clova train` arguments, "killed": (exit code, output, metrics.jsonl lines
    as the kill left them), "resumed": the rerun's CompletedProcess}
    """
    import json

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("pipeline") / "run"
    args = ["train", *TRAIN_ARGS, "--data", korean_shards, "--out", run, "--nproc-per-node", "2", "--no-tensorboard",
            "--deepspeed", repo / "deepspeed_configs" / "pipeline_zero1.json", "--partition", "type:Block"]
    r = clova_cli(*args, env={"CLOVA_FAULT": "kill_at_step=10"})
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    killed = (r.returncode, r.stdout + r.stderr, lines)
    return {"run": run, "args": args, "killed": killed, "resumed": clova_cli(*args)}


# ---- end train --------------------------------------------------------------


# ---- serve (issue 18) -------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_lm, tmp_path_factory) -> Path:
    """The tiny trained GPT written as an exported HF dir by the export code (weights, config, tokenizer).

    Its position table is extended from 192 to 1024 rows (the new ones at their
    initial scale), so a streamed request can run long enough to be cut off.
    """
    import dataclasses

    import torch

    from clova_train.export.consolidate import expected_shapes
    from clova_train.export.hf import hf_config, write_hf_tokenizer, write_weights

    model, tok = tiny_lm
    cfg = dataclasses.replace(model.cfg, block_size=1024)
    state = dict(model.state_dict())
    extra = torch.randn(cfg.block_size - model.cfg.block_size, cfg.n_embd, generator=torch.Generator().manual_seed(0))
    state["wpe.weight"] = torch.cat([state["wpe.weight"], cfg.init_std * extra])

    class InMemory:
        """The trained weights seen as export's Consolidated checkpoint."""

        source = "a GPT trained in the test process"
        shapes = expected_shapes(cfg)

        def tensors(self):
            return ((name, state[name]) for name in self.shapes)

        def close(self):
            pass

    out = tmp_path_factory.mktemp("tiny_hf") / "tiny-ko"
    out.mkdir()
    write_weights(InMemory(), out, torch.float32, 1 << 40)
    hf_config(cfg, tok, "fp32").to_json_file(str(out / "config.json"))
    write_hf_tokenizer(tok, out, cfg.block_size)
    return out


# ---- end serve --------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is; elsewhere they are collected and skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
