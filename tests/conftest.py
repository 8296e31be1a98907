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
    from clova_train.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(konlpy_files, out, TokenizerConfig(vocab_size=2000), show_progress=False)
    return out
