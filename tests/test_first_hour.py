"""What a new user trips on in the first hour (issue 23), each asserted on what the CLI prints or writes.

Cheap on purpose: CLI calls in process (Typer's runner) on the session's small
fixtures; the only subprocesses check that argument errors answer before torch loads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from clova_train.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def clova(*args) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args], env=ENV)
    return r.exit_code, r.output


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# ---------------------------------------------------------------- 1. a preset's context is the default --seq-len


def test_plan_and_train_default_to_the_presets_own_context(korean_shards, tmp_path):
    from clova_train.training.run.config import TrainRequest
    from clova_train.training.run.resolve import prepare

    for preset, positions in (("tiny", 256), ("small", 512), ("1.3b", 2048)):
        code, output = clova("plan", "--model", preset, "--gpus", "1", "--json")
        assert code == 0 and json.loads(output)["config"]["seq_len"] == positions, output
    spec = prepare(TrainRequest(out=str(tmp_path / "a"), model="tiny", data=[str(korean_shards)], train={"steps": 2, "global_batch": 4}), 1, check=False)
    assert spec.train.seq_len == 256
    spec = prepare(TrainRequest(out=str(tmp_path / "b"), model="tiny", data=[str(korean_shards)], train={"steps": 2, "global_batch": 4, "seq_len": 64}), 1, check=False)
    assert spec.train.seq_len == 64


# ---------------------------------------------------------------- 7. preset names and a fast cold start


def test_preset_names_are_case_insensitive_and_near_misses_are_named():
    code, output = clova("plan", "--model", "1.3B", "--gpus", "1")
    assert code == 0 and "plan: 1.3b on 1 x 1 a100" in output, output
    for typo, hint in (("7b", "6.9b"), ("7B", "6.9b"), ("12b", "13b"), ("tinny", "tiny"), ("100m", "137m")):
        code, output = clova("plan", "--model", typo)
        assert code == 2 and f"did you mean {hint}?" in one_line_error(output), (typo, output)
    code, output = clova("plan", "--model", "banana")
    assert code == 2 and "did you mean" not in one_line_error(output) and "choose one of tiny, small" in output


ARGUMENT_ERRORS = [
    ["--help"],
    ["plan", "--model", "7b"],
    ["train", "--model", "7bb", "--data", "missing/", "--out", "runs/x"],
    ["generate", "missing/", "국회는"],
    ["serve", "missing/"],
    ["eval", "missing/", "--task", "nsmc", "--data", "x.tsv"],
    ["ptune", "missing/", "--task", "nsmc", "--train", "x.tsv", "--valid", "y.tsv", "--out", "p/"],
    ["export", "missing/", "--out", "hf/"],
    ["tokenize", "missing.jsonl", "--tokenizer", "tok/", "--out", "shards/"],
]


@pytest.mark.parametrize("argv", ARGUMENT_ERRORS, ids=[" ".join(a[:2]) for a in ARGUMENT_ERRORS])
def test_help_and_argument_errors_answer_before_torch_loads(argv, tmp_path):
    """A typo costs what Python and Typer cost, not torch's, DeepSpeed's and transformers' imports (several seconds)."""
    script = (
        "import sys\n"
        "from clova_train.cli import app\n"
        "heavy = lambda: [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not heavy(), heavy()\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'heavy', heavy(), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"exit {0 if argv == ['--help'] else 2} heavy []", r.stdout + r.stderr
    if argv != ["--help"]:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 2, r.stderr


def test_help_has_no_bool_label_on_flags():
    for args in ([], ["generate"], ["train"], ["serve"], ["tokenizer", "train"]):
        code, output = clova(*args, "--help")
        assert code == 0 and "--help" in output and "<bool>" not in output, output
    code, output = clova("generate", "--help")
    assert re.search(r"--stream +Print the text", output), output


# ---------------------------------------------------------------- 3. a short vocabulary is not silent


def test_a_vocabulary_far_below_the_request_warns_with_the_fix(tmp_path, konlpy_lines):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in konlpy_lines[:200]), encoding="utf-8")
    code, output = clova("tokenizer", "train", corpus, "--vocab-size", "51200", "--sample-fraction", "0.2", "--out", tmp_path / "tok", "-q")
    assert code == 0, output
    warning = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "where 51,200 were asked" in warning[0] and "--sample-fraction (it was 0.2" in warning[0], output
    code, output = clova("tokenizer", "train", corpus, "--vocab-size", "600", "--out", tmp_path / "tok2", "-q")
    assert code == 0 and "warning" not in output, output


# ---------------------------------------------------------------- 4. a failed first run does not lock its dir


@pytest.fixture()
def content_jsonl(tmp_path, konlpy_lines) -> Path:
    path = tmp_path / "content.jsonl"
    path.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in konlpy_lines[:120]), encoding="utf-8")
    return path


def test_tokenize_with_the_wrong_text_key_then_the_right_one(content_jsonl, tokenizer_dir, tmp_path):
    out = tmp_path / "shards"
    code, output = clova("tokenize", content_jsonl, "--tokenizer", tokenizer_dir, "--out", out)
    assert code == 2 and "no 'text' key (found: content); set --text-key" in one_line_error(output.splitlines()[-1])
    for _ in range(2):  # the fix, and its rerun
        code, output = clova("tokenize", content_jsonl, "--tokenizer", tokenizer_dir, "--out", out, "--text-key", "content")
        assert code == 0, output
    assert json.loads((out / "manifest.json").read_text())["totals"]["documents_written"] > 0


def test_dedup_with_the_wrong_text_key_then_the_right_one_and_changed_settings_named(content_jsonl, tmp_path):
    out = tmp_path / "clean"
    code, output = clova("dedup", content_jsonl, "--out", out, "-q")
    assert code == 2 and "no 'text' key" in output, output
    code, output = clova("dedup", content_jsonl, "--out", out, "--text-key", "content", "-q")
    assert code == 0 and (out / "manifest.json").is_file(), output
    from clova_train.dedup.config import DedupConfig

    code, output = clova("dedup", content_jsonl, "--out", out, "--text-key", "content", "--threshold", "0.7", "-q")
    assert code == 2 and f"threshold: {DedupConfig().threshold} then, 0.7 now" in one_line_error(output), output


# ---------------------------------------------------------------- 5. validation on many ranks


def test_validation_scores_the_windows_there_are_and_says_why_when_none(korean_shards):
    from clova_train.training.data.sampler import eval_batches, no_validation_reason, open_valid_data

    valid = open_valid_data([korean_shards], seq_len=64)
    n = len(valid)
    assert 2 <= n < 32  # fewer windows than micro-batch 16 x 2 ranks
    shares = [eval_batches(valid, 256, micro_batch=16, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in shares] == [1, 1] and shares[0][0].shape[0] == shares[1][0].shape[0] == n // 2
    assert not any(bool((a == b).all()) for a in shares[0] for b in shares[1])  # different windows on each rank
    # Enough windows for whole micro-batches: as before, rounded to micro-batch x ranks.
    assert sum(len(b) for b in eval_batches(valid, 8, micro_batch=2, rank=0, world=2)) == 4
    assert no_validation_reason(n, 0, 256, 2) == "--eval-every 0"
    assert "valid split is empty" in no_validation_reason(0, 1000, 256, 2)
    assert no_validation_reason(3, 1000, 256, 8).startswith("the valid split has 3 windows, fewer than the 8 data-parallel ranks")


# ---------------------------------------------------------------- 9. start-up lines


def test_the_plan_on_cpu_ranks_says_per_rank(tmp_path):
    from clova_train.training.plan import PlanConfig, estimate, plan_table

    est = estimate(PlanConfig(model="tiny", gpus=1, gpu_mem=23.5401, precision="fp32"))
    console = Console(record=True, width=120)
    console.print(plan_table(est, [], devices="cpu ranks", per="rank", time=False))
    text = console.export_text()
    assert "plan: tiny on 1 x 1 cpu ranks of 23.5 GB" in text and "per GPU" not in text and "total per rank" in text, text


def test_the_sample_index_is_one_line_however_many_epochs(korean_shards, tmp_path):
    from clova_train.shards.index import build_indices

    lines: list[str] = []
    build_indices([korean_shards], tmp_path / "cache", seq_len=64, seed=1, epochs=[8], note=lines.append)
    assert len(lines) == 1 and "train of" in lines[0] and "epochs 0-7" in lines[0] and "valid of" in lines[0], lines
    build_indices([korean_shards], tmp_path / "cache", seq_len=64, seed=1, epochs=[8], note=lines.append)
    assert len(lines) == 1  # nothing built, nothing said


# ---------------------------------------------------------------- 11. partial-character tokens


def test_tokenizer_show_spells_partial_characters_as_bytes(tokenizer_dir):
    from clova_train.tokenizer.bpe import ClovaTokenizer

    text = "국회는 뷁"  # a syllable the konlpy text never uses: byte tokens
    tok = ClovaTokenizer.load(tokenizer_dir)
    assert any(len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80 for i in tok.encode(text))
    code, output = clova("tokenizer", "show", tokenizer_dir, text)
    assert code == 0 and "\ufffd" not in output and r"\xeb" in output, output


# ---------------------------------------------------------------- 12. small things


def test_tokenizer_stats_labels_its_columns(tokenizer_dir, konlpy_files):
    code, output = clova("tokenizer", "stats", tokenizer_dir, konlpy_files[0], "--limit", "50")
    assert code == 0 and "encode speed (MB/s)" in output and "encode mb per s" not in output, output
    assert "checking documents" in output  # the progress bar, not 20 silent seconds


def test_make_does_not_echo_the_makefiles_comments():
    make = shutil.which("make")
    if make is None:
        pytest.skip("needs make")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([make, "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "pip install" in r.stdout, r.stdout + r.stderr
    assert not [line for line in r.stdout.splitlines() if line.lstrip().startswith("#")], r.stdout


def test_generate_and_serve_load_an_export_in_its_own_dtype(tiny_hf_dir, tmp_path):
    import torch

    from clova_train.inference.generate import load_model

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_hf_dir, bf16)
    cfg = json.loads((bf16 / "config.json").read_text())
    cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(cfg))
    assert next(load_model(bf16, device="cpu", dtype="auto")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(tiny_hf_dir, device="cpu", dtype="auto")[0].parameters()).dtype == torch.float32
    for command in ("generate", "serve"):
        code, output = clova(command, "--help")
        assert re.search(r"--dtype +<str> +auto \(the dtype the export was saved in", output), output


def test_loss_plot_has_a_title_and_the_learning_rate():
    from clova_train.training.trainer.metrics import loss_figure

    records = [{"step": s, "tokens": 512 * s, "loss": 6 - 0.1 * s, "lr": 1e-3 * min(1, s / 4)} for s in range(1, 11)]
    records[4]["valid_loss"] = 5.5
    fig = loss_figure(records, "runs/x")
    ax, ax_lr = fig.axes
    assert ax.get_title() == "runs/x: step 10, 5,120 tokens"
    assert ax_lr.get_ylabel() == "learning rate" and list(ax_lr.get_lines()[0].get_ydata()) == [r["lr"] for r in records]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "valid", "learning rate"]
