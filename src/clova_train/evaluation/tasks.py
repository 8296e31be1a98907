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

import random
import re
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.inference.generate import GenerateConfig, generate_ids, iter_jsonl, model_device
from clova_train.model.gpt import GPT

TEMPLATES = Path(__file__).parent / "resources" / "templates"
SCORE_MODES = ("sum", "mean")
PROMPT_MARK = "{prompt}"


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
    if not path.is_file():
        raise ClovaError(f"{path}: file not found")
    want = "<TAB>".join(task.tsv_columns)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if not header:
            return
        if tuple(header.split("\t")) != task.tsv_columns:
            raise ClovaError(f"{path}: columns are {header.split(chr(9))}; {task.name} files need the header {want}")
        for n, line in enumerate(f, 2):
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


@dataclass
class PromptTemplate:
    """How a task's examples become a prompt. Shipped as resources/templates/TASK.json."""

    query: str
    """One example's input, with {field} placeholders for the task's fields (e.g. {document})."""
    answer: str = " {answer}"
    """What follows the query: {answer} is the label's verbalizer or the reference. Start it with a
    space: the tokenizer attaches a space to the word after it, so the prompt and the answer then
    tokenize apart exactly as together."""
    instruction: str = ""
    """Text put verbatim before the first demonstration (end it with a newline)."""
    separator: str = "\n\n"
    """Between demonstrations, and between the last one and the query."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Likelihood tasks: label name -> the word scored after the query; every label needs one."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """Generation tasks: the answer ends before the first of these."""
    max_new_tokens: int = 32
    """Generation tasks: the longest answer generated."""
    ptune_query: str = ""
    """The query for p-tuning: {prompt} marks where trained vectors go (split evenly between marks)."""
    description: str = ""
    """A note for people reading the file."""

    def __post_init__(self) -> None:
        if not self.query:
            raise ClovaError("template query is empty")
        if _fields(self.answer) != {"answer"}:
            raise ClovaError(f"template answer must contain {{answer}} and no other field, not {self.answer!r}")
        if self.max_new_tokens < 1:
            raise ClovaError(f"template max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.ptune_query and PROMPT_MARK not in self.ptune_query:
            raise ClovaError(f"template ptune_query must contain {PROMPT_MARK} where the trained vectors go")
        if any(not s for s in self.stop):
            raise ClovaError("template stop has an empty string, which would end every answer at once")

    def check(self, task: Task, where: str) -> None:
        """Fail early if the template does not fit ``task``."""
        for name, text, allowed in (
            ("query", self.query, set(task.inputs)),
            ("ptune_query", self.ptune_query.replace(PROMPT_MARK, ""), set(task.inputs)),
            ("instruction", self.instruction, set()),
            ("separator", self.separator, set()),
        ):
            unknown = _fields(text) - allowed
            if unknown:
                raise ClovaError(
                    f"{where}: {name} uses unknown field(s) {', '.join(sorted(unknown))}; "
                    f"{task.name} provides {', '.join(task.inputs)} (write {{{{ and }}}} for literal braces)"
                )
        if task.by_likelihood:
            if set(self.verbalizers) != set(task.labels):
                raise ClovaError(
                    f"{where}: verbalizers must map exactly the labels {', '.join(task.labels)}, "
                    f"not {', '.join(self.verbalizers) or 'nothing'}"
                )
            words = list(self.verbalizers.values())
            if any(not w for w in words) or len(set(words)) != len(words):
                raise ClovaError(f"{where}: verbalizers must be distinct and non-empty: {self.verbalizers}")
        elif self.verbalizers:
            raise ClovaError(f"{where}: verbalizers are for classification tasks; {task.name} is scored by generation")

    def demo(self, example: Example, task: Task) -> str:
        """A demonstration: the query answered with the gold label's verbalizer or first reference."""
        return self.query.format(**example.fields) + self.answer_text(self.gold_answer(example, task)) + self.separator

    def gold_answer(self, example: Example, task: Task) -> str:
        return self.verbalizers[example.gold] if task.by_likelihood else example.gold[0]  # type: ignore[index]

    def answer_text(self, answer: str) -> str:
        return self.answer.format(answer=answer)

    def ptune_pieces(self, example: Example, n_vectors: int) -> list[str | int]:
        """The p-tuning query as text pieces and vector counts, the vectors split evenly between marks."""
        parts = self.ptune_query.split(PROMPT_MARK)
        marks = len(parts) - 1
        pieces: list[str | int] = [parts[0].format(**example.fields)]
        for i, part in enumerate(parts[1:]):
            pieces += [n_vectors // marks + (i < n_vectors % marks), part.format(**example.fields)]
        return pieces


def _fields(text: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ClovaError(f"template text {text!r}: {e} (write {{{{ and }}}} for literal braces)") from None


def template_path(task: Task) -> Path:
    return TEMPLATES / f"{task.name}.json"


def load_template(task: Task, path: str | Path | None = None) -> PromptTemplate:
    """The task's template from ``path``, or the one shipped with the package; checked against the task."""
    from clova_train.core.config import load_json

    path = Path(path) if path else template_path(task)
    template = load_json(PromptTemplate, path)
    template.check(task, str(path))
    return template


# ------------------------------------------------------------------ prompts


@dataclass
class Prepared:
    """An example turned into model input."""

    example: Example
    prompt: str
    """The prompt as text; [P] stands for each trained p-tuning vector."""
    ids: list[int]
    shots: int
    """Demonstrations that fit in the context (fewer than asked when the prompt was too long)."""


def sample_demos(train: Sequence[Example], k: int, seed: int, index: int, example: Example) -> list[Example]:
    """k demonstrations for example ``index``, never the example itself; the same for the same seed
    whatever --limit or batch size is used."""
    if k > len(train):
        raise ClovaError(f"cannot draw {k} demonstrations from a train file of {len(train)} examples; lower --shots")
    rng = random.Random(f"{seed}:{index}")
    picked = [train[i] for i in rng.sample(range(len(train)), min(k + 1, len(train)))]
    return [d for d in picked if d.fields != example.fields][:k]


def _pieces(template: PromptTemplate, task: Task, example: Example, demos: list[Example], n_vectors: int) -> list[str | int]:
    head = template.instruction + "".join(template.demo(d, task) for d in demos)
    if n_vectors:
        pieces = template.ptune_pieces(example, n_vectors)
        return [head + pieces[0], *pieces[1:]]  # type: ignore[operator]
    return [head + template.query.format(**example.fields)]


def encode_pieces(tok, prompts: Sequence[Sequence[str | int]], slot_base: int) -> list[list[int]]:
    """Ids of each prompt: text pieces encoded (in one batch), each vector j as id slot_base + j."""
    texts = [p for prompt in prompts for p in prompt if isinstance(p, str)]
    encoded = iter(tok.encode_batch(texts))
    out = []
    for prompt in prompts:
        ids: list[int] = []
        slot = 0
        for p in prompt:
            if isinstance(p, str):
                ids += next(encoded)
            else:
                ids += range(slot_base + slot, slot_base + slot + p)
                slot += p
        out.append(ids)
    return out


def prepare(
    model: GPT,
    tok,
    task: Task,
    template: PromptTemplate,
    examples: Sequence[Example],
    train: Sequence[Example] = (),
    *,
    shots: int = 0,
    seed: int = 0,
    n_vectors: int = 0,
    reserve: int,
) -> list[Prepared]:
    """Prompts for ``examples`` with ``shots`` demonstrations each, dropping the earliest
    demonstrations of a prompt that would leave fewer than ``reserve`` positions for the answer."""
    if n_vectors and not template.ptune_query:
        raise ClovaError(f"the {task.name} template has no ptune_query: p-tuning needs {PROMPT_MARK} marks in one")
    limit = model.cfg.block_size - reserve
    demos = [sample_demos(train, shots, seed, i, ex) if shots else [] for i, ex in enumerate(examples)]
    pieces = [_pieces(template, task, ex, d, n_vectors) for ex, d in zip(examples, demos)]
    ids = encode_pieces(tok, pieces, model.cfg.vocab_size)
    for i, ex in enumerate(examples):
        while len(ids[i]) > limit and demos[i]:
            demos[i] = demos[i][1:]
            pieces[i] = _pieces(template, task, ex, demos[i], n_vectors)
            ids[i] = encode_pieces(tok, [pieces[i]], model.cfg.vocab_size)[0]
        if len(ids[i]) > limit:
            raise ClovaError(
                f"{ex.where}: the prompt has {len(ids[i])} tokens even without demonstrations; the model's context "
                f"of {model.cfg.block_size} leaves {limit} after {reserve} for the answer; shorten the text or template"
            )
        if not ids[i]:
            raise ClovaError(f"{ex.where}: the prompt is empty; the template's query must produce some text")
    return [
        Prepared(ex, "".join(p if isinstance(p, str) else "[P]" * p for p in pc), prompt_ids, len(d))
        for ex, pc, prompt_ids, d in zip(examples, pieces, ids, demos)
    ]


def prompt_embedder(model: GPT, vectors: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Input embeddings for ids where id vocab_size + j means trained vector j (differentiable)."""
    base = model.cfg.vocab_size

    def embed(ids: torch.Tensor) -> torch.Tensor:
        slot = ids >= base
        tokens = model.wte(ids.masked_fill(slot, 0))  # (B, T, C)
        own = vectors.to(tokens.dtype)[(ids - base).clamp(0, len(vectors) - 1)]  # (B, T, C)
        return torch.where(slot[..., None], own, tokens)

    return embed


# ------------------------------------------------------------------ scoring


def sequence_logprobs(
    model: GPT, batch: Sequence[tuple[Sequence[int], Sequence[int]]], embed: Callable | None = None
) -> torch.Tensor:
    """(B,) sum of log p(continuation | context) per (context ids, continuation ids); differentiable.

    Rows are right-padded (causal attention never looks right), and the head
    runs only at the positions that predict a continuation token.
    """
    device = model_device(model)
    T = max(len(c) + len(x) - 1 for c, x in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (ctx, cont) in enumerate(batch):
        if not ctx or not cont:
            raise ValueError("context and continuation must both be non-empty")
        seq = [*ctx, *cont]
        ids[r, : len(seq) - 1] = torch.tensor(seq[:-1])
        rows += [r] * len(cont)
        cols += range(len(ctx) - 1, len(seq) - 1)
        targets += cont
    ids = ids.to(device)
    h = model.hidden(None, inputs_embeds=embed(ids)) if embed is not None else model.hidden(ids)  # (B, T, C)
    rows_t = torch.tensor(rows, device=device)
    logp = model.head(h[rows_t, torch.tensor(cols, device=device)]).float().log_softmax(-1)  # (N, vocab)
    picked = logp.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)  # (N,)
    return torch.zeros(len(batch), device=device, dtype=picked.dtype).index_add(0, rows_t, picked)


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so each batch (padding included) stays within batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # The first (longest) index of a batch sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_requests(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_tokens: int,
    embed: Callable | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[float]:
    """Log-likelihood of each (context, continuation), batched by token budget."""
    scores = [0.0] * len(requests)
    for batch in token_batches([len(c) + len(x) for c, x in requests], batch_tokens):
        for i, lp in zip(batch, sequence_logprobs(model, [requests[i] for i in batch], embed).tolist()):
            scores[i] = lp
        if advance:
            advance(len(batch))
    return scores


def pick_label(scores: dict[str, dict], mode: str) -> str:
    """The label whose continuation is most likely: total log-probability, or per token ("mean")."""
    value = (lambda s: s["logprob"]) if mode == "sum" else (lambda s: s["logprob"] / s["tokens"])
    return max(scores, key=lambda label: value(scores[label]))


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


# ------------------------------------------------------------------ running a task


def run_task(
    model: GPT,
    tok,
    task: Task,
    template: PromptTemplate,
    examples: Sequence[Example],
    train: Sequence[Example] = (),
    *,
    shots: int = 0,
    seed: int = 0,
    score: str = "sum",
    batch_tokens: int = 16384,
    batch_size: int = 32,
    vectors: torch.Tensor | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one record per example) for ``examples``; ``vectors`` are p-tuning's trained prompt."""
    embed = prompt_embedder(model, vectors) if vectors is not None else None
    n_vectors = len(vectors) if vectors is not None else 0
    if task.by_likelihood:
        conts = {label: template.answer_text(word) for label, word in template.verbalizers.items()}
        cont_ids = dict(zip(conts, tok.encode_batch(list(conts.values()))))
        if not all(cont_ids.values()):
            raise ClovaError(f"a verbalizer encodes to no tokens: {conts}")
        reserve = max(map(len, cont_ids.values()))
    else:
        reserve = template.max_new_tokens
    prepared = prepare(model, tok, task, template, examples, train, shots=shots, seed=seed, n_vectors=n_vectors, reserve=reserve)
    records = [
        {"index": i, "where": p.example.where, "shots": p.shots, "prompt": p.prompt, "gold": p.example.gold}
        for i, p in enumerate(prepared)
    ]
    if task.by_likelihood:
        labels = list(cont_ids)
        requests = [(p.ids, cont_ids[label]) for p in prepared for label in labels]
        logprobs = iter(score_requests(model, requests, batch_tokens=batch_tokens, embed=embed, advance=advance))
        for rec in records:
            rec["scores"] = {
                label: {"continuation": conts[label], "logprob": next(logprobs), "tokens": len(cont_ids[label])}
                for label in labels
            }
            rec["prediction"] = pick_label(rec["scores"], score)
            rec["correct"] = rec["prediction"] == rec["gold"]
    else:
        cfg = GenerateConfig(temperature=0.0, max_new_tokens=template.max_new_tokens, stop=list(template.stop), batch_size=batch_size)
        completions = generate_ids(model, tok, [p.ids for p in prepared], cfg, embed=embed, advance=advance)
        for rec, c in zip(records, completions):
            rec["generation"] = c.text
            rec["prediction"] = c.text.strip()
            rec["gold"] = list(rec["gold"])
            if "exact_match" in task.metrics:
                rec["exact_match"] = korquad_em(rec["prediction"], rec["gold"])
                rec["f1"] = korquad_f1(rec["prediction"], rec["gold"])
    return task_metrics(task, records), records


@dataclass
class EvalConfig:
    """An in-context evaluation run."""

    task: str
    """One of TASKS: nsmc, ynat, sts, korquad, translation."""
    data: str
    """The examples to score, in the task's format."""
    train: str = ""
    """Where demonstrations come from (same format); needed when shots > 0."""
    shots: int = 0
    """Demonstrations per prompt (K); fewer when the prompt would not fit the context."""
    seed: int = 0
    """Seed of the demonstration sample."""
    limit: int = 0
    """Score only the first N examples (0: all)."""
    template: str = ""
    """A template JSON file; empty: the one shipped for the task."""
    ptune: str = ""
    """A `clova ptune` output directory: its trained prompt and template are used."""
    score: str = "sum"
    """How label log-likelihoods compare: sum over the verbalizer's tokens, or mean per token."""
    batch_tokens: int = 16384
    """Tokens per scoring batch, padding included (larger is faster on a big GPU)."""
    batch_size: int = 32
    """Prompts per generation batch (QA and translation)."""
    out: str = ""
    """The JSON results file; empty: eval-TASK-Kshot.json in the working directory."""

    def __post_init__(self) -> None:
        get_task(self.task)
        if not self.data:
            raise ClovaError("no data file: give --data FILE")
        if self.shots < 0:
            raise ClovaError(f"shots must be >= 0, not {self.shots}")
        if self.shots and not self.train:
            raise ClovaError(f"--shots {self.shots} needs --train FILE to draw demonstrations from")
        if self.limit < 0:
            raise ClovaError(f"limit must be >= 0 (0: all), not {self.limit}")
        if self.score not in SCORE_MODES:
            raise ClovaError(f"score must be one of {', '.join(SCORE_MODES)}, not {self.score!r}")
        if self.batch_tokens < 1 or self.batch_size < 1:
            raise ClovaError("batch_tokens and batch_size must be >= 1")
        if self.ptune and self.template:
            raise ClovaError("--ptune brings the template it was trained with; drop --template")

    @property
    def out_path(self) -> Path:
        return Path(self.out or f"eval-{self.task}-{self.shots}shot.json")


def evaluate(model: GPT, tok, cfg: EvalConfig, *, model_name: str = "", show_progress: bool = True) -> dict:
    """Score ``cfg.data`` with ``model``; write and return the results (metrics and every example)."""
    from clova_train.core.progress import progress_bar
    from clova_train.core.files import atomic_write_json

    t0 = time.perf_counter()
    task = get_task(cfg.task)
    vectors = None
    if cfg.ptune:
        from clova_train.evaluation.ptune import load_prompt

        trained = load_prompt(cfg.ptune, model, task)
        template, vectors = trained.template, trained.vectors
    else:
        template = load_template(task, cfg.template or None)
    examples = read_examples(task, cfg.data, limit=cfg.limit)
    train = read_examples(task, cfg.train) if cfg.shots else []
    steps = len(examples) * (len(task.labels) or 1)
    with progress_bar(f"{task.name} {cfg.shots}-shot", steps, enabled=show_progress) as advance:
        metrics, records = run_task(
            model, tok, task, template, examples, train, shots=cfg.shots, seed=cfg.seed, score=cfg.score,
            batch_tokens=cfg.batch_tokens, batch_size=cfg.batch_size, vectors=vectors, advance=advance,
        )
    result = {
        "task": task.name,
        "family": task.family,
        "metrics": metrics,
        "examples_scored": len(records),
        "config": asdict(cfg),
        "model": model_name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer_hash": getattr(tok, "hash", None),
        "template": asdict(template),
        "scoring": _scoring_note(task, cfg),
        "clova_train_version": __version__,
        "seconds": time.perf_counter() - t0,
        "examples": records,
    }
    if "bleu" in task.metrics:
        result["bleu_signature"] = bleu([r["prediction"] for r in records], [r["gold"] for r in records])[1]
    atomic_write_json(cfg.out_path, result)
    result["out"] = str(cfg.out_path)
    return result


def _scoring_note(task: Task, cfg: EvalConfig) -> str:
    vectors = " Prompts with [P] hold trained p-tuning vectors (see the ptune directory)." if cfg.ptune else ""
    if task.by_likelihood:
        how = "summed" if cfg.score == "sum" else "averaged per token"
        return (
            "Each label's logprob is log p(continuation | prompt) with ids = tokenizer(prompt) + "
            f"tokenizer(continuation), {how}; the prediction is the label with the highest." + vectors
        )
    return "Greedy decoding after the prompt, cut at the first stop string, stripped of surrounding spaces." + vectors
