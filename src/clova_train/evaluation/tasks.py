"""In-context few-shot evaluation on Korean tasks, as in the HyperCLOVA paper.

Each task belongs to a family that decides how it is scored:

- classification (NSMC sentiment, YNAT topics) and sentence pairs (KLUE-STS,
  binary): the model's log-likelihood of each label's verbalizer after the
  prompt; the most likely label is the prediction.
- extractive QA (KorQuAD): greedy generation, exact match and character F1.
- translation (AI Hub style): greedy generation, corpus BLEU (sacrebleu).

A prompt is ``instruction + (query + answer + separator) per demonstration +
query``; templates are JSON files a user can copy and edit (see
``resources/templates``). K demonstrations per example are drawn from a
train file with a seed. The saved JSON holds, for every example, the exact
prompt and each label's continuation and log-likelihood, so the numbers can
be recomputed with ``transformers`` alone: ids = tok(prompt) + tok(continuation).

P-tuning's trained vectors enter a prompt as ids past the vocabulary
(``model.cfg.vocab_size + j`` is vector j), which :func:`prompt_embedder`
swaps for the vectors; everything else treats them as ordinary ids.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


from clova_train.core.errors import ClovaError
from clova_train.core.textfiles import iter_jsonl, text_lines

SCORE_MODES = ("sum", "mean")


# ------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Example:
    """One line of a data file."""

    fields: dict[str, str]
    """The template's placeholders (the task's input fields)."""
    gold: str | tuple[str, ...]
    """Label name (likelihood tasks) or reference texts (generation tasks)."""
    where: str
    """file:line, for messages and the results."""


def _label(value, labels: tuple[str, ...], where: str, task: str) -> str:
    """A label given by name or by its index in ``labels``."""
    if isinstance(value, str) and value in labels:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[value]
    if isinstance(value, str) and value.strip().isdigit() and 0 <= int(value) < len(labels):
        return labels[int(value)]
    shown = ", ".join(f"{i}={name}" if name != str(i) else name for i, name in enumerate(labels))
    raise ClovaError(f"{where}: unknown label {value!r}; {task} labels are {shown}")


def _class_label(record: dict, where: str, task: "Task") -> str:
    return _label(record["label"], task.labels, where, task.name)


def _sts_label(record: dict, where: str, task: "Task") -> str:
    # KLUE-STS: binary_label when present, else the 0-5 similarity thresholded at 3.
    if "binary_label" in record:
        return _label(record["binary_label"], task.labels, where, task.name)
    score = record["label"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 5:
        raise ClovaError(f"{where}: label must be a similarity from 0 to 5 (or give binary_label 0/1), not {score!r}")
    return "1" if score >= 3.0 else "0"


def _references(key: str) -> Callable[[dict, str, "Task"], tuple[str, ...]]:
    def parse(record: dict, where: str, task: "Task") -> tuple[str, ...]:
        value = record[key]
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ClovaError(f"{where}: {key!r} must be a non-empty string or list of non-empty strings, not {value!r}")
        return tuple(refs)

    return parse


@dataclass(frozen=True)
class Task:
    """A task: its file format, the fields a template may use, its labels and metrics."""

    name: str
    family: str
    description: str
    inputs: tuple[str, ...]
    """Fields copied from each line into the template."""
    gold_keys: tuple[str, ...]
    """Fields holding the answer (any one of them is enough)."""
    parse_gold: Callable[[dict, str, "Task"], str | tuple[str, ...]]
    metrics: tuple[str, ...]
    labels: tuple[str, ...] = ()
    """Label names in id order; a line may give a label by name or by id."""
    tsv_columns: tuple[str, ...] = ()
    """Header of a tab-separated file (NSMC); empty: the task reads jsonl."""

    @property
    def by_likelihood(self) -> bool:
        return bool(self.labels)


YNAT_LABELS = ("IT과학", "경제", "사회", "생활문화", "세계", "스포츠", "정치")

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("nsmc", "classification", "NSMC movie-review sentiment (0 negative, 1 positive)",
             ("document",), ("label",), _class_label, ("accuracy",), ("0", "1"), ("id", "document", "label")),
        Task("ynat", "classification", "KLUE-YNAT news-headline topic (7 classes)",
             ("title",), ("label",), _class_label, ("accuracy", "macro_f1"), YNAT_LABELS),
        Task("sts", "sentence pair", "KLUE-STS semantic similarity, binary (similarity >= 3)",
             ("sentence1", "sentence2"), ("binary_label", "label"), _sts_label, ("binary_f1", "accuracy"), ("0", "1")),
        Task("korquad", "extractive QA", "KorQuAD 1.0 reading comprehension",
             ("context", "question"), ("answers",), _references("answers"), ("exact_match", "f1")),
        Task("translation", "translation", "AI Hub parallel corpus, source -> target",
             ("source",), ("target",), _references("target"), ("bleu",)),
    ]
}

FORMATS = {
    "nsmc": "TSV with the header id<TAB>document<TAB>label, label 0 or 1 (NSMC's ratings_*.txt as published)",
    "ynat": 'jsonl: {"title": "...", "label": 0-6 or a topic name}',
    "sts": 'jsonl: {"sentence1": "...", "sentence2": "...", "label": 0-5 similarity} or "binary_label": 0/1',
    "korquad": 'jsonl: {"context": "...", "question": "...", "answers": ["...", ...]}',
    "translation": 'jsonl: {"source": "...", "target": "..."}',
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ClovaError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------ data files


def read_examples(task: Task, path: str | Path, *, limit: int = 0) -> list[Example]:
    """The examples of a data file in the task's format; a malformed line is an error naming it."""
    path = Path(path)
    rows = _tsv_rows(task, path) if task.tsv_columns else iter_jsonl(path, hint=f"{task.name} expects {FORMATS[task.name]}")
    examples = []
    for n, record in rows:
        examples.append(_example(task, record, f"{path}:{n}"))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise ClovaError(f"{path}: no examples (the file is empty); {task.name} expects {FORMATS[task.name]}")
    return examples


def _tsv_rows(task: Task, path: Path):
    want = "<TAB>".join(task.tsv_columns)
    lines = text_lines(path)
    header = next(lines, (1, ""))[1].rstrip("\r\n")
    if not header:
        return
    if tuple(header.split("\t")) != task.tsv_columns:
        raise ClovaError(f"{path}: columns are {header.split(chr(9))}; {task.name} files need the header {want}")
    for n, line in lines:
        line = line.rstrip("\r\n")
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(task.tsv_columns):
            raise ClovaError(f"{path}:{n}: {len(cols)} tab-separated fields, expected {len(task.tsv_columns)} ({want})")
        yield n, dict(zip(task.tsv_columns, cols))


def _example(task: Task, record: dict, where: str) -> Example:
    missing = [k for k in task.inputs if k not in record]
    if missing or not any(k in record for k in task.gold_keys):
        need = ", ".join(task.inputs) + ", " + " or ".join(task.gold_keys)
        raise ClovaError(f"{where}: missing field(s) {', '.join(missing or task.gold_keys)}; {task.name} lines need {need}")
    for k in task.inputs:
        if not isinstance(record[k], str):
            raise ClovaError(f"{where}: field {k!r} must be a string, not {type(record[k]).__name__}")
    return Example({k: record[k] for k in task.inputs}, task.parse_gold(record, where, task), where)


# ------------------------------------------------------------------ templates


# ------------------------------------------------------------------ metrics (0-100)


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    return 100.0 * sum(p == g for p, g in zip(pred, gold)) / len(gold)


def f1_for(pred: Sequence[str], gold: Sequence[str], label: str) -> float:
    tp = sum(p == label and g == label for p, g in zip(pred, gold))
    fp = sum(p == label and g != label for p, g in zip(pred, gold))
    fn = sum(p != label and g == label for p, g in zip(pred, gold))
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    """Mean F1 over the labels that occur in gold or predictions (KLUE-YNAT's metric)."""
    seen = [label for label in labels if label in set(gold) | set(pred)]
    return sum(f1_for(pred, gold, label) for label in seen) / len(seen)


_KORQUAD_SYMBOLS = re.compile("['\"《》<>〈〉()‘’]")


def korquad_normalize(text: str) -> str:
    """KorQuAD 1.0's official answer normalisation: symbols and punctuation out, lower case, single spaces."""
    text = _KORQUAD_SYMBOLS.sub(" ", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(text.split())


def korquad_em(pred: str, refs: Sequence[str]) -> float:
    return 100.0 * max(korquad_normalize(pred) == korquad_normalize(r) for r in refs)


def korquad_f1(pred: str, refs: Sequence[str]) -> float:
    """Character-level F1 (spaces ignored), best over the references, as KorQuAD's script computes it."""

    def one(ref: str) -> float:
        p = list(korquad_normalize(pred).replace(" ", ""))
        g = list(korquad_normalize(ref).replace(" ", ""))
        same = sum((Counter(p) & Counter(g)).values())
        if not same:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 100.0 * 2 * precision * recall / (precision + recall)

    return max(one(r) for r in refs)


def bleu(pred: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, str]:
    """Corpus BLEU with sacrebleu's defaults, and sacrebleu's signature of how it was computed."""
    from sacrebleu.metrics import BLEU

    n = max(map(len, refs))
    # sacrebleu wants one stream per reference slot; a missing slot repeats the first reference.
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]
    metric = BLEU()
    return metric.corpus_score(list(pred), streams).score, str(metric.get_signature())


def task_metrics(task: Task, records: Sequence[dict]) -> dict[str, float]:
    pred = [r["prediction"] for r in records]
    gold = [r["gold"] for r in records]
    compute = {
        "accuracy": lambda: accuracy(pred, gold),
        "macro_f1": lambda: macro_f1(pred, gold, task.labels),
        "binary_f1": lambda: f1_for(pred, gold, task.labels[-1]),
        "exact_match": lambda: sum(r["exact_match"] for r in records) / len(records),
        "f1": lambda: sum(r["f1"] for r in records) / len(records),
        "bleu": lambda: bleu(pred, gold)[0],
    }
    return {m: compute[m]() for m in task.metrics}
