"""Running a task: scoring label log-likelihoods or generating answers, and `clova eval`'s results file."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.inference.generate import GenerateConfig, generate_ids, model_device
from clova_train.model.gpt import GPT
from clova_train.evaluation.prompts import load_prompt, PromptTemplate, load_template, prepare, prompt_embedder
from clova_train.evaluation.tasks import SCORE_MODES, Example, Task, bleu, get_task, korquad_em, korquad_f1, read_examples, task_metrics


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
    """The JSON results file; empty: eval-TASK-Kshot.json (eval-TASK-ptuned.json with ``ptune``) in the working directory."""

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
    def setting(self) -> str:
        """How the model was prompted, for titles and file names: "p-tuned" or "K-shot"."""
        return "p-tuned" if self.ptune else f"{self.shots}-shot"

    @property
    def out_path(self) -> Path:
        # A p-tuned result gets its own name, so it never overwrites the plain zero-shot one.
        return Path(self.out or f"eval-{self.task}-{self.setting.replace('-', '')}.json")


def evaluate(model: GPT, tok, cfg: EvalConfig, *, model_name: str = "", show_progress: bool = True) -> dict:
    """Score ``cfg.data`` with ``model``; write and return the results (metrics and every example)."""
    from clova_train.core.progress import progress_bar
    from clova_train.core.files import atomic_write_json

    t0 = time.perf_counter()
    task = get_task(cfg.task)
    vectors = None
    if cfg.ptune:
        trained = load_prompt(cfg.ptune, model, task)
        template, vectors = trained.template, trained.vectors
    else:
        template = load_template(task, cfg.template or None)
    examples = read_examples(task, cfg.data, limit=cfg.limit)
    train = read_examples(task, cfg.train) if cfg.shots else []
    steps = len(examples) * (len(task.labels) or 1)
    with progress_bar(f"{task.name} {cfg.setting}", steps, enabled=show_progress) as advance:
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
