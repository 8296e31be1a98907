"""`clova dedup`: planted near-duplicates on the real konlpy text, quality filters, counts, determinism, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.dedup.config import DedupConfig
from clova_train.dedup.plant import EDITS, distinct_documents, plant, sentence_mixes
from clova_train.dedup.run import dedup_corpus
from clova_train.dedup.stages import EXIT_AT_ENV
from clova_train.text.quality import QualityRecipe, check_document, load_recipe
from clova_train.text.readers import check_inputs, iter_documents

from conftest import clova_cli

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def duplicates(out: Path) -> dict[str, dict]:
    with open(out / "duplicates.jsonl.zst", "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
        return {r["id"]: r for r in map(json.loads, z.read().decode().splitlines())}


def kept_texts(out: Path) -> list[str]:
    return [d.text for p in check_inputs([out]) for d in iter_documents(p)]


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def planted(konlpy_files, tmp_path_factory):
    """Distinct real documents and sentence mixes, then one planted near-duplicate of each edit kind per 2 docs."""
    recipe = QualityRecipe()
    base = [d for d in distinct_documents(konlpy_files, min_chars=1000) if check_document(d, recipe) is None]
    assert len(base) >= 20, "the konlpy text gives enough distinct documents"
    base += sentence_mixes(base, 40)
    rows = plant(base, 25, seed=3)
    path = write_jsonl(tmp_path_factory.mktemp("planted") / "corpus.jsonl", [t for t, _, _ in rows])
    return path, rows, len(base)


@pytest.fixture(scope="session")
def planted_out(planted, tmp_path_factory):
    path, _, _ = planted
    out = tmp_path_factory.mktemp("dedup") / "out"
    report = dedup_corpus([path], out, DedupConfig(workers=1), show_progress=False)
    return out, report


def test_planted_near_duplicates_are_removed_and_name_the_kept_original(planted, planted_out):
    path, rows, n_base = planted
    out, report = planted_out
    dups = duplicates(out)
    found = 0
    for line, (_, orig, kind) in enumerate(rows, start=1):
        rec = dups.get(f"{path.name}:line {line}")
        if kind is None:
            assert rec is None, f"distinct document line {line} was removed as a duplicate of {rec and rec['kept_id']}"
        elif rec is not None:
            assert rec["kept_id"] == f"{path.name}:line {orig + 1}", (kind, rec)
            assert rec["reason"] in ("near_duplicate", "exact_duplicate")
            found += 1
    assert found >= 0.9 * (len(rows) - n_base)
    kinds = {k for _, _, k in rows if k}
    assert kinds == set(EDITS)
    quality = sum(n for reason, n in report["totals"]["removed"].items() if not reason.endswith("duplicate"))
    assert len(kept_texts(out)) == report["totals"]["documents_kept"] == len(rows) - found - quality


def test_manifest_counts_add_up_and_samples_are_seeded(planted, planted_out, tmp_path):
    out, _ = planted_out
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "clova-dedup"
    for rec in man["inputs"]:
        assert rec["documents_read"] == rec["documents_kept"] + sum(rec["removed"].values())
        assert len(rec["sha256"]) == 64 and rec["bytes"] > 0
    t = man["totals"]
    assert t["documents_read"] == t["documents_kept"] + t["documents_removed"]
    assert sum(p["documents"] for p in man["parts"]) == t["documents_kept"]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in samples} == set(t["removed"])
    assert all("kept_id" in s for s in samples if s["reason"].endswith("duplicate"))
    # another seed samples other documents of the same reasons; the same seed the same ones
    path = planted[0]
    other = dedup_corpus([path], tmp_path / "seed9", DedupConfig(seed=9, samples_per_reason=3), show_progress=False)
    assert other["totals"]["removed"].keys() == t["removed"].keys()


def test_counts_per_input_with_skipped_bad_documents(tmp_path, planted):
    _, rows, _ = planted
    a = write_jsonl(tmp_path / "a.jsonl", [t for t, _, _ in rows[:30]])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": rows[0][0]}, ensure_ascii=False) + "\n{not json\n" + json.dumps({"other": 1}) + "\n", encoding="utf-8")
    dedup_corpus([a, b], tmp_path / "out", DedupConfig(on_error="skip"), show_progress=False)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ra, rb = man["inputs"]
    assert ra["documents_read"] == 30 and rb["documents_read"] == 3
    assert rb["removed"] == {"exact_duplicate": 1, "invalid_json": 1, "missing_text_key": 1}
    assert rb["documents_kept"] == 0
    assert duplicates(tmp_path / "out")["b.jsonl:line 1"]["kept_id"] == "a.jsonl:line 1"  # across inputs, the earlier input wins


@pytest.fixture(scope="session")
def split_corpus(planted, tmp_path_factory):
    """The planted corpus in three inputs (so every per-input stage has tasks to spread), deduped with one worker."""
    _, rows, _ = planted
    d = tmp_path_factory.mktemp("split")
    texts = [t for t, _, _ in rows]
    paths = [write_jsonl(d / f"in{k}.jsonl", texts[k::3]) for k in range(3)]
    dedup_corpus(paths, d / "w1", DedupConfig(workers=1), show_progress=False)
    return paths, d / "w1"


def test_same_bytes_for_any_worker_count(split_corpus, tmp_path):
    paths, w1 = split_corpus
    dedup_corpus(paths, tmp_path / "w2", DedupConfig(workers=2), show_progress=False)
    assert files(tmp_path / "w2") == files(w1)
    man = json.loads((w1 / "manifest.json").read_text())
    assert [p["name"] for p in man["parts"]] == ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"]
    assert man["totals"]["removed"].get("near_duplicate", 0) > 0


def test_same_bytes_for_any_line_partition_count(split_corpus, tmp_path):
    """--line-partitions only spreads the boilerplate count over more tasks (less memory each): same output."""
    paths, w1 = split_corpus
    r = clova_cli("dedup", *paths, "--out", tmp_path / "p3", "--line-partitions", 3, "--quiet")
    assert r.returncode == 0, r.stderr
    ours, ref = files(tmp_path / "p3"), files(w1)
    assert {k: v for k, v in ours.items() if k != "manifest.json"} == {k: v for k, v in ref.items() if k != "manifest.json"}
    man = json.loads(ours["manifest.json"])
    assert man["config"]["line_partitions"] == 3 and man["totals"] == json.loads(ref["manifest.json"])["totals"]


def _killed_then_resumed(paths, out: Path, stage: str, workers: int) -> None:
    args = ["dedup", *paths, "--out", out, "--quiet", "--workers", workers]
    r = clova_cli(*args, env={EXIT_AT_ENV: stage}, start_new_session=True)
    assert r.returncode == -9, r.stderr  # every process SIGKILLed, as a killed job's: no cleanup, no manifest
    assert not (out / "manifest.json").exists() and (out / ".work").is_dir()
    r = clova_cli(*args)
    assert r.returncode == 0, r.stderr
    r = clova_cli(*args, env={"COLUMNS": "200"})
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout


@pytest.mark.parametrize("stage", ["signature:0", "write:0"])
def test_a_killed_run_resumes_to_the_same_bytes(planted, planted_out, tmp_path, stage):
    _killed_then_resumed([planted[0]], tmp_path / "out", stage, 1)
    assert files(tmp_path / "out") == files(planted_out[0])


def test_a_killed_parallel_run_resumes_to_the_same_bytes(split_corpus, tmp_path):
    paths, w1 = split_corpus
    _killed_then_resumed(paths, tmp_path / "out", "signature:1", 2)
    assert files(tmp_path / "out") == files(w1)


def test_a_rerun_with_other_settings_is_refused(planted, planted_out):
    path, _, _ = planted
    out, _ = planted_out
    with pytest.raises(ClovaError, match="other inputs or settings"):
        dedup_corpus([path], out, DedupConfig(threshold=0.7), show_progress=False)


def test_boilerplate_lines_are_stripped_and_exact_duplicates_counted(tmp_path, planted):
    _, rows, _ = planted
    texts = [t for t, k, _ in rows if k is None][:8]
    nav = "홈 | 카페소개 | 공지사항 | 자유게시판 | 사진첩 | 회원가입 | 로그인"
    corpus = [nav + "\n" + t for t in texts] + [texts[0]]
    path = write_jsonl(tmp_path / "c.jsonl", corpus)
    dedup_corpus([path], tmp_path / "out", DedupConfig(), QualityRecipe(boilerplate_min_docs=5), show_progress=False)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["totals"]["boilerplate_lines_stripped"] == 8
    assert man["totals"]["removed"] == {"exact_duplicate": 1}  # the last one equals the first once its nav bar is gone
    assert all(nav not in t for t in kept_texts(tmp_path / "out"))


def _korean(n: int) -> str:
    words = "대한민국 국민 자유 권리 의무 헌법 법률 국가 정부 국회 선거 재판 법원 행정 지방 자치 경제 사회 문화 교육".split()
    return " ".join(f"{words[(i * 7) % len(words)]}{i}" for i in range(n))


@pytest.mark.parametrize(
    "reason,text,recipe",
    [
        ("too_short", "짧은 글.", QualityRecipe()),
        ("too_long", _korean(400), QualityRecipe(max_chars=1000)),
        ("low_hangul", "This page is mostly English text, with only 한국어 two words in it here and there.", QualityRecipe()),
        ("low_hangul", "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。", QualityRecipe()),
        ("not_korean", "The quick summary: 요약 is the Korean word for summary, and 안녕하세요 means hello; the rest of this page explains the English grammar of greetings in detail.", QualityRecipe()),
        ("repeated_lines", "\n".join(["같은 줄이 반복되는 문서입니다 여러 번"] * 5 + [_korean(30)]), QualityRecipe()),
        ("repeated_ngrams", " ".join(["좋은 상품 최저가 할인"] * 20) + " " + _korean(20), QualityRecipe()),
    ],
)
def test_each_quality_filter_triggers_on_a_crafted_document(reason, text, recipe):
    assert check_document(text, recipe) == reason
    assert check_document(_korean(60), recipe) is None


def test_recipe_loads_strictly(tmp_path):
    shipped = load_recipe(ROOT / "recipes" / "korean_quality.json")
    assert shipped == QualityRecipe()
    (tmp_path / "r.json").write_text(json.dumps({"min_chars": 10, "max_hangul": 1}))
    with pytest.raises(ClovaError, match="unknown key.*max_hangul"):
        load_recipe(tmp_path / "r.json")
    with pytest.raises(ClovaError, match="min_hangul_share"):
        QualityRecipe(min_hangul_share=1.5)


def test_bad_input_is_one_line_or_a_counted_skip(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": _korean(40)}, ensure_ascii=False) + "\n{oops\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["dedup", str(bad), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2, res.output
    assert "bad.jsonl: line 2: not valid JSON" in res.output and "--on-error skip" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2
    res = CliRunner().invoke(app, ["dedup", str(bad), "--out", str(tmp_path / "s"), "-q", "--on-error", "skip"])
    assert res.exit_code == 0, res.output
    assert "invalid_json" in res.output
    res = CliRunner().invoke(app, ["dedup", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_output_is_accepted_by_clova_tokenize(planted_out, tokenizer_dir, tmp_path):
    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig, read_manifest

    out, report = planted_out
    tokenize_corpus([out], tokenizer_dir, tmp_path / "shards", ShardConfig(valid_fraction=0.0, workers=1), show_progress=False)
    man = read_manifest(tmp_path / "shards")
    assert man["totals"]["documents_read"] == report["totals"]["documents_kept"]
    assert man["totals"]["documents_skipped"] == 0  # nothing left for tokenize's exact dedup to drop


def test_slurm_stages_pickle_and_a_missing_sbatch_is_one_line(planted, tmp_path, monkeypatch):
    import dill

    from clova_train.dedup.run import SlurmOptions
    from clova_train.dedup.stages import ReadStep

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, as on a machine outside the cluster
    with pytest.raises(ClovaError, match="needs Slurm's sbatch"):
        dedup_corpus([planted[0]], tmp_path / "out", DedupConfig(), slurm=SlurmOptions(partition="cpu"), show_progress=False)
    # datatrove pickled the first stage for its jobs before calling sbatch: our steps travel to the nodes
    with open(tmp_path / "out" / ".work" / "logs" / "read" / "executor.pik", "rb") as f:
        executor = dill.load(f)
    assert isinstance(executor.pipeline[0], ReadStep) and executor.tasks == 1
    r = CliRunner().invoke(app, ["dedup", str(planted[0]), "--out", str(tmp_path / "o2"), "--slurm-partition", "cpu", "--slurm-mem-per-cpu", "0"])
    assert r.exit_code == 2 and "--slurm-mem-per-cpu must be at least 1, not 0" in r.output and "Traceback" not in r.output


def test_slurm_template_is_valid_bash_and_its_flags_exist():
    import subprocess

    template = ROOT / "cli" / "slurm_dedup.sbatch"
    r = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    help_text = CliRunner().invoke(app, ["dedup", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--slurm-partition", "--slurm-time", "--on-error", "--quiet", "--out"):
        assert flag in template.read_text() and flag in help_text


def _needs_help(lang: str, every: int) -> list[str]:
    """LibreOffice's help pages in ``lang`` (Debian; .ci/run installs them): skipped outside CI when missing, failed in CI."""
    import os

    from clova_train.dedup.realtext import HELP_PACKAGES, HELP_ROOT, help_pages

    if not (HELP_ROOT / lang / "text").is_dir():
        msg = f"apt-get install --no-install-recommends {HELP_PACKAGES[lang]} (see .ci/run)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return help_pages(lang, every=every)


def test_language_filter_keeps_korean_with_english_terms_and_removes_english_and_japanese(konlpy_files):
    """The default recipe on real text: Korean prose with English terms and code kept, English and Japanese removed."""
    from clova_train.dedup.realtext import code_mixed, korean_pages, python_help_topics

    english = python_help_topics()
    translated, untranslated = korean_pages(_needs_help("ko", every=3))
    korean = {
        "konlpy with English words and code": code_mixed(distinct_documents(konlpy_files, min_chars=300), english, 80),
        "Korean help pages": translated[::4],
    }
    foreign = {"Python docs (en)": english, "Korean help's untranslated pages (en)": untranslated, "Japanese help pages": _needs_help("ja", every=20)}
    recipe = QualityRecipe()
    for name, docs in korean.items():
        kept = [check_document(d, recipe) for d in docs]
        assert len(docs) >= 50 and kept.count(None) >= 0.9 * len(docs), (name, {r: kept.count(r) for r in set(kept)})
    for name, docs in foreign.items():
        reasons = [check_document(d, recipe) for d in docs]
        assert len(docs) >= 20 and sum(r in ("low_hangul", "not_korean") for r in reasons) >= 0.95 * len(docs), (name, reasons)
    # the previous Hangul-share rule (half of the letters) is what dropped the Korean help
    old = QualityRecipe(min_hangul_share=0.5, language_model="")
    assert sum(check_document(d, old) == "low_hangul" for d in korean["Korean help pages"]) > 0.2 * len(korean["Korean help pages"])


def test_input_ids_and_fields_are_kept_and_output_does_not_depend_on_the_folder(planted, tmp_path):
    _, rows, _ = planted
    texts = [t for t, k, _ in rows if k is None][:6]
    lines = [{"id": f"doc-{i}", "url": f"https://example.org/{i}", "text": t} for i, t in enumerate(texts)]
    lines[3] = {"text": lines[3]["text"], "source": "blog"}  # no id of its own: one is made from the input's name and line
    lines.append({"id": "copy", "text": texts[0]})
    for where in ("a", "b/deeper"):
        d = tmp_path / where / "corpus"
        d.mkdir(parents=True)
        (d / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
        dedup_corpus([d / "in.jsonl"], tmp_path / where / "out", DedupConfig(), show_progress=False)
    a, b = files(tmp_path / "a" / "out"), files(tmp_path / "b/deeper" / "out")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    with open(tmp_path / "a" / "out" / "part-00000.jsonl.zst", "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
        out = [json.loads(line) for line in z.read().decode().splitlines()]
    assert [r["id"] for r in out] == ["doc-0", "doc-1", "doc-2", "in.jsonl:line 4", "doc-4", "doc-5"]
    assert out[0]["url"] == "https://example.org/0" and out[3]["source"] == "blog" and list(out[0]) == ["id", "url", "text"]
    assert duplicates(tmp_path / "a" / "out")["copy"]["kept_id"] == "doc-0"


def test_parquet_columns_are_kept_as_fields(planted, tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    _, rows, _ = planted
    texts = [t for t, k, _ in rows if k is None][:3]
    when = [datetime.datetime(2024, 1, d) for d in (1, 2, 3)]
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(3)], "text": texts, "crawled": when}), tmp_path / "in.parquet")
    dedup_corpus([tmp_path / "in.parquet"], tmp_path / "out", DedupConfig(), show_progress=False)
    with open(tmp_path / "out" / "part-00000.jsonl.zst", "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
        out = [json.loads(line) for line in z.read().decode().splitlines()]
    assert [(r["url"], r["id"]) for r in out] == [("u0", "in.parquet:row 0"), ("u1", "in.parquet:row 1"), ("u2", "in.parquet:row 2")]
    assert out[1]["crawled"] == "2024-01-02 00:00:00" and list(out[1]) == ["url", "crawled", "text", "id"]


def test_language_id_takes_a_lone_surrogate():
    """A bad \\ud800 escape in a JSON row reaches the filters as a lone surrogate; the model must not crash on it."""
    text = "\ud800 " + _korean(60)
    assert check_document(text, QualityRecipe()) is None
