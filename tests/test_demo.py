"""`clova demo` end to end: the same code path as `make demo`, with fewer training steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _clova(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    clova = Path(sys.executable).parent / "clova"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(clova), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    r = _clova("demo", "--out", "run", "--steps", "24", "--quiet", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "run", r


def test_demo_runs_every_stage(demo):
    out, r = demo
    clean = json.loads((out / "clean" / "manifest.json").read_text())
    removed = clean["totals"]["removed"]
    assert removed.get("exact_duplicate", 0) > 0 and removed.get("near_duplicate", 0) > 0  # konlpy repeats itself
    assert (out / "tokenizer" / "clova_tokenizer.json").is_file()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert any(s["split"] == "valid" for s in manifest["shards"])
    records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if "loss" in x]
    assert len(losses) == 24 and losses[-1] < losses[0] - 1.0
    assert any("valid_loss" in x for x in records)
    assert (out / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenization_clova.py").is_file()
    assert "clova demo: done" in r.stdout
    generated = r.stdout.split("generated")[1].split("\n")[0]
    assert "대한민국 헌법은" in generated and any("\uac00" <= ch <= "\ud7a3" for ch in generated.split("헌법은", 1)[1])
    assert "clova train --model" in r.stdout  # next steps for one's own corpus
    assert re.search(r"\d[\d,]* read, \d[\d,]* written, \d[\d,]* skipped", r.stdout), r.stdout  # every count is a number


def test_demo_rerun_reuses_finished_stages(demo):
    out, _ = demo
    r = _clova("demo", "--out", "run", "--steps", "24", "--quiet", cwd=out.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("reusing finished output") == 5
    for stage in ("dedup", "tokenizer", "shards", "train", "export"):
        assert f"[{stage}] reusing finished output" in r.stderr
