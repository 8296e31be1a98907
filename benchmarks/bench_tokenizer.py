"""Morpheme-aware BPE vs plain byte-level BPE: training and encoding throughput, side by side.

Both tokenizers learn the same vocabulary size from the same text with the
same cores, then encode the same text. Our encode is measured cold (a fresh
tokenizer whose eojeol cache is empty, so MeCab runs on every new eojeol) and
warm (second pass). Run: ``python benchmarks/bench_tokenizer.py [--mb 20]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import konlpy_corpus_dir  # noqa: E402


def konlpy_lines() -> list[str]:
    d = konlpy_corpus_dir()
    files = [d / "kolaw" / "constitution.txt", *sorted((d / "kobill").glob("*.txt"))]
    return [l for f in files for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]


def generated_lines(base: list[str], mb: float, seed: int = 0) -> list[str]:
    """Recombined real sentences; about 10% of eojeols get novel syllables, so not every word repeats."""
    rng = random.Random(seed)
    words = [w for l in base for w in l.split()]
    out, size = [], 0
    while size < mb * 1e6:
        n = rng.randint(8, 40)
        ws = []
        for _ in range(n):
            w = rng.choice(words)
            if rng.random() < 0.1:
                w = "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 3))) + w
            ws.append(w)
        line = " ".join(ws)
        out.append(line)
        size += len(line.encode()) + 1
    return out


def train_plain(lines: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def bench(name: str, lines: list[str], vocab: int, workdir: Path) -> None:
    mb = sum(len(l.encode()) + 1 for l in lines) / 1e6
    path = workdir / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    t = time.perf_counter()
    plain = train_plain(lines, vocab)
    t_plain_train = time.perf_counter() - t
    t = time.perf_counter()
    train_tokenizer([path], workdir / f"tok_{name}", TokenizerConfig(vocab_size=vocab), show_progress=False)
    t_ours_train = time.perf_counter() - t

    batch = 1000
    t = time.perf_counter()
    for i in range(0, len(lines), batch):
        plain.encode_batch(lines[i : i + batch])
    t_plain_enc = time.perf_counter() - t

    ours = ClovaTokenizer.load(workdir / f"tok_{name}")
    t = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(lines), batch):
        n_tokens += sum(map(len, ours.encode_batch(lines[i : i + batch])))
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(lines), batch):
        ours.encode_batch(lines[i : i + batch])
    t_warm = time.perf_counter() - t
    n_plain = sum(len(e.ids) for e in plain.encode_batch(lines[:2000]))
    n_ours = sum(map(len, ours.encode_batch(lines[:2000])))

    print(f"\n== {name}: {mb:.1f} MB, {len(lines):,} lines, vocab {vocab}, {os.cpu_count()} cores")
    print(f"train   plain BPE {mb / t_plain_train:8.2f} MB/s   morpheme-aware {mb / t_ours_train:8.2f} MB/s   ratio {t_plain_train / t_ours_train:5.2f}x")
    print(f"encode  plain BPE {mb / t_plain_enc:8.2f} MB/s   morpheme-aware cold {mb / t_cold:8.2f} MB/s   ratio {t_plain_enc / t_cold:5.2f}x")
    print(f"        {'':26} morpheme-aware warm {mb / t_warm:8.2f} MB/s   ratio {t_plain_enc / t_warm:5.2f}x")
    print(f"tokens on 2000 lines: plain {n_plain:,}  morpheme-aware {n_ours:,}  ({n_ours / n_plain:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=20.0, help="size of the generated corpus")
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    base = konlpy_lines()
    with tempfile.TemporaryDirectory() as d:
        bench("konlpy", base, 3000, Path(d))
        bench("generated", generated_lines(base, args.mb), args.vocab, Path(d))


if __name__ == "__main__":
    main()
