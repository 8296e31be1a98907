"""`clova tokenize` end to end on real Korean text: round trip, counts, determinism, resume, nodes, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.shards.format import ShardConfig, open_split, read_manifest, verify_shard_dir
from clova_train.shards.build import EXIT_AFTER_SHARDS_ENV, node_files, slurm_node_slice, tokenize_corpus
from clova_train.shards.keys import KeySet, is_valid
from clova_train.shards.merge import merge_shard_dirs
from clova_train.tokenizer.bpe import ClovaTokenizer

# Small shards and small batches so that the ~140 KB of real text makes ~10
# shards and many batches: boundaries inside batches get exercised.
SETTINGS = dict(shard_tokens=3000, valid_fraction=0.2, workers=1, batch_chars=4096)
CLI_SETTINGS = ["--shard-tokens", "3000", "--valid-fraction", "0.2", "--quiet"]


def run(inputs, tokenizer_dir, out, **overrides) -> dict:
    return tokenize_corpus(inputs, tokenizer_dir, out, ShardConfig(**{**SETTINGS, **overrides}), show_progress=False)


def clean(text: str) -> str:
    """The documented cleaning, written independently: control characters but \\t and \\n out, then NFC."""
    kept = "".join(c for c in text if c in "\t\n" or unicodedata.category(c) != "Cc")
    return unicodedata.normalize("NFC", kept)


def expected_documents(files, valid_fraction=0.2, dedup=True) -> dict:
    """What the shards must hold, from the raw files: one document per non-blank line, in order."""
    out: dict = {"train": [], "valid": [], "duplicates": 0, "read": 0}
    seen: set[str] = set()
    for f in files:
        for line in Path(f).read_text(encoding="utf-8").split("\n"):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            out["read"] += 1
            text = clean(line)
            if dedup and text in seen:
                out["duplicates"] += 1
                continue
            seen.add(text)
            out["valid" if is_valid(text, valid_fraction) else "train"].append(text)
    return out


def decoded(shard_dir, tok: ClovaTokenizer, split: str) -> list[str]:
    docs = []
    for ds in open_split(shard_dir, split):
        for ids in ds:
            assert ids[-1] == tok.eod_id, "every document ends with the end-of-document token"
            docs.append(tok.decode(ids[:-1].tolist()))
    return docs


def tokens(shard_dir, split: str) -> list[list[int]]:
    return [ids.tolist() for ds in open_split(shard_dir, split) for ids in ds]


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> ClovaTokenizer:
    return ClovaTokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory, konlpy_files, tokenizer_dir) -> Path:
    """The reference: one node, one worker, uninterrupted."""
    out = tmp_path_factory.mktemp("single") / "shards"
    run(konlpy_files, tokenizer_dir, out)
    return out


# ------------------------------------------------------------------ content


def test_round_trip_real_text(single, konlpy_files, tok):
    want = expected_documents(konlpy_files)
    assert decoded(single, tok, "train") == want["train"]
    assert decoded(single, tok, "valid") == want["valid"]
    man = read_manifest(single)
    assert man["split"]["train"]["shards"] >= 5, "small shards: boundaries are exercised"
    assert man["tokenizer"]["hash"] == tok.hash and man["tokenizer"]["eod_id"] == tok.eod_id


def test_counts_add_up(single, konlpy_files):
    man = read_manifest(single)
    want = expected_documents(konlpy_files)
    t = man["totals"]
    assert t["documents_read"] == want["read"]
    assert t["documents_written"] == len(want["train"]) + len(want["valid"])
    assert man["skipped"]["by_reason"] == {"duplicate": want["duplicates"]}
    assert t["documents_read"] == t["documents_written"] + t["documents_skipped"]
    for rec in man["inputs"]:
        written = rec["documents_written"]["train"] + rec["documents_written"]["valid"]
        assert rec["documents_read"] == written + rec["documents_skipped"]
        assert len(rec["sha256"]) == 64 and rec["bytes"] == Path(rec["path"]).stat().st_size
    assert [r["path"] for r in man["inputs"]] == [str(f) for f in konlpy_files]
    assert sum(r["tokens"] for r in man["shards"]) == t["tokens"]


def test_byte_identical_for_any_worker_count(single, konlpy_files, tokenizer_dir, tmp_path):
    run(konlpy_files, tokenizer_dir, tmp_path / "w2", workers=2, batch_chars=1 << 16)
    assert dir_bytes(tmp_path / "w2") == dir_bytes(single)  # manifest.json included


def test_split_follows_the_text_not_its_position(single, konlpy_files, tokenizer_dir, tmp_path, tok):
    run(list(reversed(konlpy_files)), tokenizer_dir, tmp_path / "rev", dedup=False)
    assert set(decoded(tmp_path / "rev", tok, "valid")) == set(decoded(single, tok, "valid"))
    man = read_manifest(tmp_path / "rev")
    assert man["skipped"]["total"] == 0
    assert man["split"]["valid"]["documents"] > len(decoded(single, tok, "valid")), "duplicates are kept without dedup"


def test_cleaning(tmp_path, tokenizer_dir, tok):
    decomposed = unicodedata.normalize("NFD", "한국어 문장입니다")
    f = tmp_path / "c.txt"
    f.write_text(
        f"제1조\x07 대한민국은\x1b 민주공화국이다.\n{decomposed}\n\x01\x02\x03\n짧음\n제1조 대한민국은 민주공화국이다.\n탭\t포함 문장\n",
        encoding="utf-8",
    )
    run([f], tokenizer_dir, tmp_path / "out", min_chars=3, valid_fraction=0.0)
    assert decoded(tmp_path / "out", tok, "train") == ["제1조 대한민국은 민주공화국이다.", "한국어 문장입니다", "탭\t포함 문장"]
    by = read_manifest(tmp_path / "out")["skipped"]["by_reason"]
    assert by == {"empty_after_cleaning": 1, "too_short": 1, "duplicate": 1}


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "datasets", "blank"])
def test_input_formats(kind, tmp_path, tokenizer_dir, tok, konlpy_lines):
    texts = konlpy_lines[:60]
    if kind == "jsonl.gz":
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in texts).encode()))
    elif kind == "jsonl.zst":
        import zstandard

        path = tmp_path / "in.jsonl.zst"
        data = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), path)
    elif kind == "datasets":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(path))
    else:
        path = tmp_path / "in.txt"
        texts = ["\n".join(texts[i : i + 3]) for i in range(0, len(texts), 3)]
        path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    extra = {"doc_sep": "blank"} if kind == "blank" else {"text_key": "body"}
    run([path], tokenizer_dir, tmp_path / "out", valid_fraction=0.0, dedup=False, **extra)
    assert decoded(tmp_path / "out", tok, "train") == [clean(t) for t in texts]


# ------------------------------------------------------------------ resume


def cli_subprocess(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from clova_train.cli import app; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def tokenize_args(files, tokenizer_dir, out) -> list[str]:
    return ["tokenize", *map(str, files), "--tokenizer", str(tokenizer_dir), "--out", str(out), *CLI_SETTINGS]


def test_resume_after_a_killed_run_gives_the_same_files(single, konlpy_files, tokenizer_dir, tmp_path):
    out = tmp_path / "killed"
    # Small batches, so the valid split has a shard half written when the process dies.
    (tmp_path / "small_batches.json").write_text(json.dumps({"batch_chars": 2048}))
    args = tokenize_args(konlpy_files, tokenizer_dir, out) + ["--workers", "2", "--config", str(tmp_path / "small_batches.json")]
    proc = cli_subprocess(args, {EXIT_AFTER_SHARDS_ENV: "3"})
    assert proc.returncode == 17, proc.stderr
    assert not (out / "manifest.json").exists()
    state = json.loads((out / "progress.json").read_text())
    assert len(state["shards"]) == 3
    names = {p.name for p in out.iterdir()}
    partial = {n for n in names if n.startswith(".")}
    assert any(n.startswith(".valid-00000.bin.tmp-") for n in partial), names
    assert names - partial == {"progress.json"} | {f"{r['prefix']}.{e}" for r in state["shards"] for e in ("bin", "idx", "keys")}

    proc = cli_subprocess(args)
    assert proc.returncode == 0, proc.stderr
    assert "kept 3 finished shards" in proc.stdout
    assert dir_bytes(out) == dir_bytes(single)


def test_resume_redoes_a_damaged_shard(single, konlpy_files, tokenizer_dir, tmp_path):
    out = tmp_path / "damaged"
    proc = cli_subprocess(tokenize_args(konlpy_files, tokenizer_dir, out), {EXIT_AFTER_SHARDS_ENV: "4"})
    assert proc.returncode == 17, proc.stderr
    finished = [r["prefix"] for r in json.loads((out / "progress.json").read_text())["shards"]]
    assert finished[:2] == ["train-00000", "train-00001"]
    victim = out / "train-00001.bin"
    data = bytearray(victim.read_bytes())
    data[3] ^= 1
    victim.write_bytes(bytes(data))
    report = run(konlpy_files, tokenizer_dir, out)
    assert report["resumed_shards"] == 4 - sum(p.startswith("train") for p in finished[1:])
    assert dir_bytes(out) == dir_bytes(single)


def test_rerun_of_a_finished_run_and_changed_settings(single, konlpy_files, tokenizer_dir):
    report = run(konlpy_files, tokenizer_dir, single)
    assert report["already_complete"]
    with pytest.raises(ClovaError, match=r"other inputs or settings \(shard_tokens: 3000 then, 5000 now\)"):
        run(konlpy_files, tokenizer_dir, single, shard_tokens=5000)


def test_refuses_an_unrelated_non_empty_dir(tmp_path, konlpy_files, tokenizer_dir):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ClovaError, match="not empty and is not a shard dir"):
        run(konlpy_files[:1], tokenizer_dir, tmp_path)


# ------------------------------------------------------------------ many machines


def test_node_slices_merged_equal_a_single_node_run(single, konlpy_files, tokenizer_dir, tmp_path):
    k = 3
    nodes = [tmp_path / f"node-{r}" for r in range(k)]
    for r, d in enumerate(nodes):
        run(konlpy_files, tokenizer_dir, d, num_nodes=k, node_rank=r)
    slices = [[r["path"] for r in read_manifest(d)["inputs"]] for d in nodes]
    assert all(slices) and sum(slices, []) == [str(f) for f in konlpy_files]

    report = merge_shard_dirs(list(reversed(nodes)), tmp_path / "merged")
    merged = tmp_path / "merged"
    for split in ("train", "valid"):
        assert tokens(merged, split) == tokens(single, split)
    man, ref = read_manifest(merged), read_manifest(single)
    assert man["node"]["cross_node_duplicates"] > 0, "the bills repeat lines across files"
    assert any(s.get("view") for s in man["shards"])
    assert [s["prefix"].startswith("../node-") for s in man["shards"]].count(True) >= 1
    same = lambda totals: {k: v for k, v in totals.items() if k != "shards"}  # noqa: E731  (node shards end early)
    assert same(man["totals"]) == same(ref["totals"])
    assert man["skipped"]["by_reason"] == ref["skipped"]["by_reason"]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "skipped"} for r in recs]  # noqa: E731
    assert strip(man["inputs"]) == strip(ref["inputs"])
    assert report["documents_written"] == ref["totals"]["documents_written"]
    assert verify_shard_dir(merged)["train"]["documents"] == ref["split"]["train"]["documents"]
    # Nothing was copied: every .bin in the merged dir is a symlink.
    assert all(p.is_symlink() for p in merged.glob("*.bin"))

    with pytest.raises(ClovaError, match=r"missing node rank\(s\) \[1\]"):
        merge_shard_dirs([nodes[0], nodes[2]], tmp_path / "bad")


def test_node_files_are_contiguous_disjoint_and_balanced():
    sizes = [5, 100, 3, 3, 50, 50, 0, 1, 80, 20, 7]
    for k in range(1, 8):
        parts = [node_files(sizes, k, r) for r in range(k)]
        assert sum(parts, []) == list(range(len(sizes)))
        for p in parts:
            assert p == list(range(p[0], p[-1] + 1)) if p else True
    halves = [sum(sizes[i] for i in node_files(sizes, 2, r)) for r in range(2)]
    assert abs(halves[0] - halves[1]) <= max(sizes)
    assert node_files([0, 0, 0, 0], 2, 1) == [2, 3]


def test_slurm_array_defaults():
    assert slurm_node_slice({}) is None
    assert slurm_node_slice({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2"}) == (4, 2)
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10"}
    assert slurm_node_slice(env) == (4, 2)
    with pytest.raises(ClovaError, match="not rank 0..3"):
        slurm_node_slice({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "9"})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=12))
def test_keyset_matches_a_python_set(batches):
    ks, ref = KeySet(), set()
    for batch in batches:
        want = []
        for k in batch:
            want.append(k not in ref)
            ref.add(k)
        assert ks.add_new(np.array(batch, dtype=np.uint64)).tolist() == want
    assert len(ks) == len(ref)


# ------------------------------------------------------------------ bad input


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def make_bad(kind: str, d: Path, good: list[str]) -> tuple[Path, str, str]:
    """(file, skip reason, pattern the error must match) for one kind of bad input."""
    body = "".join(t + "\n" for t in good)
    jl = "".join(json.dumps({"text": t}) + "\n" for t in good * 20)
    if kind == "truncated_gz":
        p = d / "cut.jsonl.gz"
        p.write_bytes(_truncated(gzip.compress(jl.encode())))
        return p, "truncated_input", r"cut\.jsonl\.gz: compressed stream is truncated .*after line \d+"
    if kind == "truncated_zst":
        import zstandard

        p = d / "cut.jsonl.zst"
        p.write_bytes(_truncated(zstandard.ZstdCompressor().compress(jl.encode())))
        return p, "truncated_input", r"cut\.jsonl\.zst: compressed stream is truncated .*after line \d+"
    if kind == "not_json":
        p = d / "bad.jsonl"
        p.write_text(json.dumps({"text": good[0]}) + "\n{oops\n" + json.dumps({"text": good[1]}) + "\n", encoding="utf-8")
        return p, "invalid_json", r"bad\.jsonl: line 2: not valid JSON"
    if kind == "missing_key":
        p = d / "bad.jsonl"
        p.write_text(json.dumps({"text": good[0]}) + "\n" + json.dumps({"body": good[1]}) + "\n", encoding="utf-8")
        return p, "missing_text_key", r"bad\.jsonl: line 2: no 'text' key"
    if kind == "nul_byte":
        p = d / "nul.txt"
        p.write_text(good[0] + "\n" + good[1] + "\x00 x\n" + good[2] + "\n", encoding="utf-8")
        return p, "nul_byte", r"nul\.txt: line 2: NUL byte"
    if kind == "invalid_utf8":
        p = d / "latin.txt"
        p.write_bytes(body.encode() + "café\n".encode("latin-1"))
        return p, "invalid_utf8", rf"latin\.txt: line {len(good) + 1}: invalid UTF-8"
    if kind == "binary":
        p = d / "model.txt"
        p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)) + b"\x00" * 100)
        return p, "binary_file", r"model\.txt: looks like a binary file"
    if kind == "huge_document":
        p = d / "huge.txt"
        with open(p, "wb") as f:
            f.write(b"x" * 50_000_000 + b"\n")
            f.write(body.encode())
        return p, "too_long", r"huge\.txt: line 1: document of 50,000,000 characters is over --max-chars"
    raise AssertionError(kind)


BAD_KINDS = ["truncated_gz", "truncated_zst", "not_json", "missing_key", "nul_byte", "invalid_utf8", "binary", "huge_document"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_a_clear_error_or_a_counted_skip(kind, tmp_path, tokenizer_dir, konlpy_lines):
    good = konlpy_lines[100:110]
    bad, reason, message = make_bad(kind, tmp_path, good)
    other = tmp_path / "good.txt"
    other.write_text("\n".join(konlpy_lines[:50]) + "\n", encoding="utf-8")
    with pytest.raises(ClovaError, match=message):
        run([other, bad], tokenizer_dir, tmp_path / "raise", on_error="raise")

    run([other, bad], tokenizer_dir, tmp_path / "skip", on_error="skip", dedup=False)
    man = read_manifest(tmp_path / "skip")
    rec = man["inputs"][1]
    assert rec["skipped"]["by_reason"].get(reason, 0) >= 1, rec["skipped"]
    for r in man["inputs"]:
        assert r["documents_read"] == r["documents_written"]["train"] + r["documents_written"]["valid"] + r["documents_skipped"]
    assert man["inputs"][0]["documents_skipped"] == 0
    verify_shard_dir(tmp_path / "skip")


def test_truncated_zst_keeps_only_complete_lines(tmp_path, tokenizer_dir, tok, konlpy_lines):
    import zstandard

    # zstd emits nothing of a cut 128 KiB block: make several blocks and cut late, so a complete prefix exists.
    lines = [f"{i}: {t}" for i, t in enumerate(konlpy_lines * 2)]
    data = zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode())
    cut = tmp_path / "cut.txt.zst"
    cut.write_bytes(data[: len(data) * 9 // 10])
    run([cut], tokenizer_dir, tmp_path / "out", on_error="skip", dedup=False, valid_fraction=0.0)
    got = decoded(tmp_path / "out", tok, "train")
    assert 0 < len(got) < len(lines)
    assert got == [clean(t) for t in lines[: len(got)]], "a cut-off last line is never written"


def test_unknown_format_fails_before_any_work(tmp_path, tokenizer_dir):
    (tmp_path / "weights.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ClovaError, match=r"weights\.pt: unknown input format"):
        run([tmp_path / "weights.pt"], tokenizer_dir, tmp_path / "out", on_error="skip")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ CLI


def test_cli_end_to_end(konlpy_files, tokenizer_dir, tmp_path, single):
    cli = CliRunner()
    nodes = []
    for r in range(2):
        out = tmp_path / f"n{r}"
        res = cli.invoke(
            app, [*tokenize_args(konlpy_files, tokenizer_dir, out), "--workers", "1"],
            env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": str(r)},
        )
        assert res.exit_code == 0, res.output
        assert read_manifest(out)["node"] == {"num_nodes": 2, "node_rank": r, "input_files_total": len(konlpy_files)}
        nodes.append(str(out))
    res = cli.invoke(app, ["tokenize", "merge", *nodes, "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert "merged 2 node dirs" in res.output
    assert tokens(tmp_path / "merged", "train") == tokens(single, "train")

    res = cli.invoke(app, ["shards", "verify", str(tmp_path / "merged"), "--quiet"])
    assert res.exit_code == 0 and "ok:" in res.output, res.output
    res = cli.invoke(app, ["shards", "inspect", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "cross-node duplicates" in res.output, res.output
    res = cli.invoke(app, ["shards", "inspect", str(single), "--json"])
    assert json.loads(res.output)["totals"] == read_manifest(single)["totals"]

    (tmp_path / "n0" / "train-00000.bin").write_bytes(b"\x00\x00")
    res = cli.invoke(app, ["shards", "verify", str(tmp_path / "n0"), "--quiet"])
    assert res.exit_code == 2 and "train-00000.bin" in res.output and "Traceback" not in res.output


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, tokenizer_dir, konlpy_lines):
    bad, _, _ = make_bad("not_json", tmp_path, konlpy_lines[:3])
    res = CliRunner().invoke(app, ["tokenize", str(bad), "-t", str(tokenizer_dir), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2
    assert "bad.jsonl: line 2: not valid JSON" in res.output and "--on-error skip" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    res = CliRunner().invoke(app, ["tokenize", "merge", str(tmp_path), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no manifest.json" in res.output


def test_cli_help_names_both_forms():
    res = CliRunner().invoke(app, ["tokenize", "--help"])
    assert res.exit_code == 0 and "clova tokenize merge" in res.output and "--shard-tokens" in res.output
    res = CliRunner().invoke(app, ["tokenize", "merge", "--help"])
    assert res.exit_code == 0 and "Usage: clova tokenize merge [OPTIONS]" in res.output


@pytest.mark.parametrize("doc_sep", ["line", "blank"])
def test_byte_ranges_read_the_same_documents_and_skips_as_the_whole_file(tmp_path, konlpy_lines, doc_sep):
    """Workers read byte ranges cut at document boundaries: together they must give the whole file's documents,
    line numbers, byte offsets in messages and skips, BOM, CRLF, bad lines and blank-looking lines included."""
    from clova_train.text.readers import SkipCounts, count_lines, iter_documents, spans

    rows = []
    for i, line in enumerate(konlpy_lines[:1500]):
        rows.append(line.encode())
        if i % 7 == 3:
            rows.append(b"")  # a paragraph break
        if i % 11 == 5:
            rows.append(" \u3000 ".encode())  # blank to str.strip(), not an ASCII blank line: no cut here
        if i % 97 == 13:
            rows.append(b"bad \xff byte")
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\r\n")

    whole_skips = SkipCounts()
    whole = [(d.text, d.where) for d in iter_documents(path, doc_sep=doc_sep, on_error="skip", skips=whole_skips)]
    ranges = spans(path, 4096, doc_sep)
    assert len(ranges) > 20 and ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    parts, part_skips, before = [], SkipCounts(), 0
    for a, b in ranges:
        parts += [(d.text, d.where) for d in iter_documents(path, doc_sep=doc_sep, on_error="skip", skips=part_skips, span=(a, b, before))]
        before += count_lines(path, a, b)
    assert parts == whole and len(whole) > 200
    assert part_skips.to_dict() == whole_skips.to_dict() and whole_skips.total > 5

    # with --on-error raise the first bad line is named the same way from inside its range
    with pytest.raises(ClovaError) as whole_error:
        list(iter_documents(path, doc_sep=doc_sep))
    before, message = 0, None
    for a, b in ranges:
        try:
            list(iter_documents(path, doc_sep=doc_sep, span=(a, b, before)))
        except ClovaError as e:
            message = str(e)
            break
        before += count_lines(path, a, b)
    assert message == str(whole_error.value) and "byte" in message


def test_output_is_the_same_for_any_part_size_and_worker_count(konlpy_files, tokenizer_dir, tmp_path):
    """Parts of 4 KiB or whole files, one worker or two: the same shards, manifest and skips (jsonl and txt)."""
    src = tmp_path / "in.jsonl"
    lines = [line for f in konlpy_files for line in f.read_text(encoding="utf-8").splitlines()]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines + lines[:200]), encoding="utf-8")
    inputs = [src, *konlpy_files]
    run(inputs, tokenizer_dir, tmp_path / "a", workers=1, batch_chars=1024)
    run(inputs, tokenizer_dir, tmp_path / "b", workers=2, batch_chars=1 << 22)
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "b").iterdir()) and len(names) > 10
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    man = read_manifest(tmp_path / "a")
    assert man["skipped"]["by_reason"].get("duplicate", 0) >= 200
