"""The settings of one `clova dedup` run: MinHash-LSH parameters, shingles, reading options, execution."""

from __future__ import annotations

from dataclasses import dataclass

from clova_train.core.errors import ClovaError
from clova_train.text.readers import check_read_options

SHINGLES = ("morpheme", "eojeol")


@dataclass
class DedupConfig:
    """MinHash-LSH defaults chosen on a measured recall / false-removal curve (README, benchmarks/bench_dedup.py).

    Copies with a sentence deleted or inserted, paragraphs swapped, a signature
    appended or 1-3% of their syllables changed keep Jaccard >= 0.7 with their
    original on morpheme 3-grams, while distinct real documents stay under
    0.35; 20 x 5 LSH makes a pair at Jaccard 0.7 a candidate with probability
    0.975, and verification at 0.6 of 100 minhashes keeps the 0.35 side out.
    """

    threshold: float = 0.6
    """A candidate pair is a near-duplicate when its estimated Jaccard (share of equal minhashes) reaches this."""
    ngram: int = 3
    """Shingle size, in units of ``shingle``."""
    bands: int = 20
    """LSH bands; two documents become a candidate pair when all rows of one band agree."""
    rows: int = 5
    """Minhashes per band; P(candidate) = 1 - (1 - J**rows)**bands (0.975 at J = 0.7 with 20 x 5)."""
    shingle: str = "morpheme"
    """'morpheme' (MeCab-ko morphemes, robust to edits inside an eojeol) or 'eojeol' (whitespace words)."""
    seed: int = 1
    """Seed of the minhash permutations and of the sample of removed documents."""
    samples_per_reason: int = 20
    """Removed documents kept per reason in samples.jsonl for inspection."""
    text_key: str = "text"
    """Text field of jsonl/parquet/datasets inputs."""
    doc_sep: str = "line"
    """.txt documents: 'line' or 'blank' (blank-line separated)."""
    on_error: str = "raise"
    """'raise' on bad input, or 'skip' it (counted by reason)."""
    max_chars: int = 4_000_000
    """A longer document is bad input, as in `clova tokenize` (its memory grows with the longest document)."""
    workers: int = 1
    """Processes running tasks at once (0: all cores); the output is the same for any count."""
    line_partitions: int = 16
    """Hash partitions of the boilerplate line count (each counting task holds 1/N of the line keys)."""

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 < self.threshold <= 1:
            raise ClovaError(f"threshold must be in (0, 1], not {self.threshold!r}")
        for name in ("ngram", "bands", "rows", "line_partitions", "max_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ClovaError(f"{name} must be an integer >= 1, not {getattr(self, name)!r}")
        if self.samples_per_reason < 0:
            raise ClovaError(f"samples_per_reason must be >= 0, not {self.samples_per_reason}")
        if self.shingle not in SHINGLES:
            raise ClovaError(f"shingle must be one of {', '.join(SHINGLES)}, not {self.shingle!r}")
        check_read_options(self.doc_sep, self.on_error, self.workers)

    def result_keys(self) -> dict:
        """The settings that change the output (``workers`` does not)."""
        return {k: v for k, v in self.__dict__.items() if k != "workers"}
