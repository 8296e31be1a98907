"""The README's walkthrough, run as written on the Korean text shipped with konlpy.

The commands are read from README.md's "Walkthrough" block, so the test fails
when the README drifts from what runs. Only the sizes a cluster needs are
made small (the table ``SMALL`` below): the tokenizer's sample of the corpus,
the model preset, the token budget and batch, the GPU count and the sample-index
size; `clova serve` gets
`--port 0` so it never collides with another server. Everything else,
including every path and flag, is the README's.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from clova_train.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "eval"
HANGUL = re.compile(r"[\uac00-\ud7a3]")

# (command, README's flag and value) -> what runs here instead: cluster sizes made CPU-test sizes.
SMALL = {
    # The recipe learns on 1% of a corpus of billions of documents; konlpy's text keeps 37 after dedup.
    ("tokenizer", "--config", "tokenizer/hyperclova.json"): ["--config", "tokenizer/hyperclova.json", "--sample-fraction", "1"],
    ("train", "--model", "6.9b"): ["--model", "tiny"],
    # 12 steps of 8 sequences of tiny's 256 tokens, instead of 150e9 tokens in batches of 1,024.
    ("train", "--train-tokens", "150e9"): ["--train-tokens", "24576", "--global-batch", "8", "--micro-batch", "4"],
    ("train", "--nproc-per-node", "8"): ["--nproc-per-node", "1"],
    ("shards", "--seq-len", "2048"): ["--seq-len", "256"],
    ("shards", "--samples", "73242624"): ["--samples", "96"],
}


def walkthrough_commands() -> list[list[str]]:
    """Every `clova ...` line of the README's walkthrough block, as argv lists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Walkthrough", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("clova ")]


def small(argv: list[str], tmp: Path) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        pair = tuple(argv[i : i + 2])
        swap = SMALL.get((argv[0], *pair))
        if swap is not None:
            out += swap
            i += 2
        elif "*" in argv[i]:  # as the shell expands it
            out += sorted(glob.glob(argv[i], root_dir=tmp)) or [argv[i]]
            i += 1
        else:
            out.append(str(tmp / "idx") if argv[i] == "/shared/idx" else argv[i])
            i += 1
    return out


def write_inputs(tmp: Path, konlpy_files: list[Path]) -> None:
    """What the walkthrough assumes is there: corpus/*.jsonl.zst, heldout.jsonl, NSMC TSVs, filters.json, tokenizer/."""
    paragraphs = [p.strip() for f in konlpy_files for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    (tmp / "corpus").mkdir()
    half = len(paragraphs) // 2
    for k, part in enumerate((paragraphs[:half], paragraphs[half:])):
        lines = "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in part)
        (tmp / "corpus" / f"part-{k}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp / "heldout.jsonl").write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs[::25]), encoding="utf-8")
    for name, source in (("nsmc_train.tsv", "nsmc_train.tsv"), ("nsmc_valid.tsv", "nsmc_test.tsv"), ("nsmc_test.tsv", "nsmc_test.tsv")):
        (tmp / name).write_text((FIXTURES / source).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp / "tokenizer").symlink_to(ROOT / "tokenizer")  # the recipes of the clone the walkthrough runs in
    (tmp / "filters.json").write_text(json.dumps({"input_banned_words": ["금지어"]}, ensure_ascii=False), encoding="utf-8")


def start_serve(argv: list[str], tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    log = tmp / "serve.log"
    cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", *argv, "--port", "0", "--device", "cpu"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"clova serve did not come up:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, found[1], log


def test_the_readme_walkthrough_runs_as_written(tmp_path, konlpy_files, monkeypatch):
    import openai

    commands = walkthrough_commands()
    assert [c[0] for c in commands] == [
        "dedup", "tokenizer", "tokenizer", "tokenizer", "tokenize", "shards", "shards", "shards", "plan",
        "train", "train", "export", "generate", "eval", "ptune", "eval", "serve",
    ]  # fmt: skip
    write_inputs(tmp_path, konlpy_files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runner = CliRunner()
    outputs = {}
    for argv in commands[:-1]:
        argv = small(argv, tmp_path)
        r = runner.invoke(app, argv, env={"COLUMNS": "200"})
        assert r.exit_code == 0, f"clova {shlex.join(argv)}\n{r.output}"
        outputs.setdefault(argv[0], []).append(r.output)

    # What each step promises, briefly: the stage's product is there and says what it is.
    assert json.loads((tmp_path / "clean" / "manifest.json").read_text())["totals"]["removed"]
    assert "warning: the vocabulary has" in outputs["tokenizer"][0] and "--vocab-size" in outputs["tokenizer"][0]
    assert "tokens crossing a morpheme (must be 0)" in outputs["tokenizer"][2]
    assert "sample index" in outputs["shards"][2] or "built" in outputs["shards"][2]
    assert "fits" in outputs["plan"][0]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "6.9b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert json.loads((tmp_path / "runs" / "6.9b" / "config.json").read_text())["train"]["seq_len"] == 256  # tiny's own context
    hf_config = json.loads((tmp_path / "hf" / "6.9b" / "config.json").read_text())
    assert hf_config.get("dtype", hf_config.get("torch_dtype")) == "bfloat16"  # transformers 4.56 renamed the key
    assert outputs["generate"][0].strip()  # 12 steps of a tiny model: text, not yet Korean
    assert json.loads((tmp_path / "nsmc.json").read_text())["metrics"]["accuracy"] >= 0
    assert "prompt written to ptune-nsmc:" in outputs["ptune"][0]
    assert json.loads((tmp_path / "eval-nsmc-ptuned.json").read_text())["config"]["ptune"] == "ptune-nsmc"

    # The Python snippet under the walkthrough: transformers loads the export with the training tokenizer.
    snippet = (ROOT / "README.md").read_text(encoding="utf-8").split("## Walkthrough", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet, scope)  # the README's own code, on the files this test wrote
    from clova_train.tokenizer.bpe import ClovaTokenizer

    text = "대한민국 헌법은 국민의 자유를 보장한다."
    assert scope["tok"](text)["input_ids"] == ClovaTokenizer.load(tmp_path / "tok").encode(text)
    assert scope["model"].config.n_layer == 2

    # 7. Serve it, and ask as the README's client does (the model's name is its directory's).
    proc, url, log = start_serve(small(commands[-1], tmp_path), tmp_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-local", max_retries=0, timeout=60)
        r = client.completions.create(model="6.9b", prompt="대한민국 헌법은", max_tokens=16, temperature=0.8, seed=1)
        assert r.choices[0].text and r.usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError, match="금지어"):
            client.completions.create(model="6.9b", prompt="금지어", max_tokens=4)
    finally:
        proc.terminate()
        proc.wait(10)
    assert re.search(r'"POST /v1/completions" 200 \d+\.\d{3}s', log.read_text()), log.read_text()
