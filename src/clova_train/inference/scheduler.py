"""Bounded generation workers: a queue of jobs, a fixed number of threads running ``generate_ids``.

A job is one request: its prompts (``n`` copies for ``n`` choices), one
:class:`GenerateConfig`, and for streaming a callback. A worker takes the
oldest job; when it is greedy and not streamed, every queued greedy job with
the same settings joins it in one left-padded batch (greedy tokens do not
depend on the batch, so each client gets what it would get alone). Sampled
jobs run alone, because their seed drives one generator for the whole batch.
A job whose client went away (streamed or not) is cancelled: a queued one is
dropped, a running one stops before its next decoding step (a batch when all
of its jobs are cancelled), and the worker moves on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from clova_train.inference.generate import Completion, GenerateConfig, generate_ids, model_device

# Most prompts one batched forward pass takes (the model's own batch size caps it too).
MAX_BATCH = 16


class Cancelled(Exception):
    """The client of a job went away."""


class QueueFull(Exception):
    """More jobs are waiting than the server accepts."""


@dataclass
class TokenInfo:
    """One token of a completion (or of an echoed prompt) with its log-probability."""

    id: int
    text: str
    logprob: float | None
    top: dict[str, float]


@dataclass
class Job:
    """One request's generation."""

    prompts: list[list[int]]
    cfg: GenerateConfig
    on_text: Callable[[int, str], None] | None = None
    """Streaming: called from the worker thread with (choice index, new text)."""
    logprobs: int | None = None
    """None: no log-probabilities; k: those of the sampled tokens plus the k likeliest alternatives."""
    echo: bool = False
    """Log-probabilities of the prompt tokens too (with ``logprobs``)."""
    embed: Callable | None = None
    """Input embeddings of this job's prompts (a trained prompt's vectors); None: the server's own."""
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def batch_key(self):
        """Jobs with equal keys may share a batch; None: this job runs alone."""
        if self.on_text is not None or self.cfg.temperature != 0:
            return None
        return replace(self.cfg, seed=0, batch_size=1), id(self.embed)

    @property
    def size(self) -> int:
        return len(self.prompts)

    capacity = MAX_BATCH


@dataclass
class Work:
    """Other work on the model (input-gradient requests): queued items with the same ``fn`` and ``args``
    run together as ``fn(*args, items)``, which returns one result per item, while their ``size``
    adds up to no more than the first one's ``capacity``."""

    fn: Callable[..., list]
    item: object
    args: tuple = ()
    size: int = 1
    capacity: int = 1
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def batch_key(self):
        return "work", self.fn, self.args


@dataclass
class JobResult:
    """What a job's future resolves to."""

    completions: list[Completion]
    tokens: list[list[TokenInfo]] | None
    """Per completion, with ``logprobs``: prompt tokens first when echoed, then the sampled ones."""
    queue_seconds: float


class Scheduler:
    """``workers`` threads serving a bounded queue of jobs with one model."""

    def __init__(self, model, tok, *, workers: int = 1, max_queue: int = 256, embed=None, on_tokens=None):
        self.model, self.tok, self.embed = model, tok, embed
        self.max_queue = max_queue
        self.busy = 0
        self.cancelled = 0
        self.batched = 0  # jobs that joined an earlier job's batch
        self._on_tokens = on_tokens or (lambda n: None)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"clova-gen-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job | Work) -> Future:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client left: a queued job never runs, a running one stops before its next decoding step."""
        if not job.future.done() and not job.cancelled.is_set():
            job.cancelled.set()
            with self._cond:
                if job in self._pending:
                    self._pending.remove(job)
                    self.cancelled += 1
                    job.future.cancel()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending.popleft()
            jobs = [first]
            key = first.batch_key()
            if key is not None:
                room = first.capacity - first.size
                for other in list(self._pending):
                    if other.batch_key() == key and room >= other.size:
                        self._pending.remove(other)
                        jobs.append(other)
                        room -= other.size
            self.batched += len(jobs) - 1
            self.busy += 1
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        """Run a batch taken by ``_take``; the worker counts as free again before any of its clients hears back, so
        /health never shows it busy after an answer (nor the cancel count ahead of it)."""
        try:
            outcomes = self._outcomes(jobs)
        finally:
            with self._cond:
                self.busy -= 1
        for job, outcome in outcomes:
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _outcomes(self, jobs: list[Job]) -> list[tuple[Job, JobResult | BaseException]]:
        """Each job's result, or the exception its request fails with."""
        started = time.perf_counter()
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return []
        if isinstance(jobs[0], Work):
            try:
                results = jobs[0].fn(*jobs[0].args, [w.item for w in jobs])
            except Exception as e:  # noqa: BLE001 - the requests fail, the worker lives on
                return [(w, e) for w in jobs]
            return list(zip(jobs, results))
        embed = jobs[0].embed or self.embed
        prompts = [p for job in jobs for p in job.prompts]
        cfg = replace(jobs[0].cfg, batch_size=min(len(prompts), MAX_BATCH))
        on_text = jobs[0].on_text  # a streamed job always runs alone

        def on_step() -> None:
            if all(job.cancelled.is_set() for job in jobs):
                raise Cancelled()

        try:
            completions = generate_ids(self.model, self.tok, prompts, cfg, embed=embed, on_text=on_text, on_step=on_step)
        except Cancelled:
            self.cancelled += len(jobs)
            return [(job, Cancelled()) for job in jobs]
        except Exception as e:  # noqa: BLE001 - the request fails, the worker lives on
            return [(job, e) for job in jobs]
        self._on_tokens(sum(len(c.token_ids) for c in completions))
        out: list[tuple[Job, JobResult | BaseException]] = []
        at = 0
        for job in jobs:
            mine = completions[at : at + len(job.prompts)]
            at += len(job.prompts)
            try:
                tokens = None
                if job.logprobs is not None:
                    tokens = [self._logprobs(p, c.token_ids, job.logprobs, job.echo, embed) for p, c in zip(job.prompts, mine)]
                out.append((job, JobResult(mine, tokens, started - job.queued_at)))
            except Exception as e:  # noqa: BLE001
                out.append((job, e))
        return out

    @torch.no_grad()
    def _logprobs(self, prompt: list[int], sampled: list[int], top: int, echo: bool, embed=None) -> list[TokenInfo]:
        """The model's own log-probabilities (temperature 1, before any filter) of each token."""
        ids = torch.tensor([prompt + sampled], device=model_device(self.model))
        if embed is not None:
            logits = self.model(None, inputs_embeds=embed(ids))
        else:
            logits = self.model(ids)
        vocab = getattr(self.tok, "vocab_size", self.model.cfg.vocab_size)
        logp = logits[0, :, :vocab].float().log_softmax(-1).cpu()  # (T, vocab)
        first = 0 if echo else len(prompt)
        out = []
        for t in range(first, len(prompt) + len(sampled)):
            i = int(ids[0, t])
            if t == 0:
                out.append(TokenInfo(i, self.token_text(i), None, {}))
                continue
            row = logp[t - 1]
            alts = {}
            if top:
                values, idx = row.topk(top)
                alts = {self.token_text(int(j)): float(v) for v, j in zip(values, idx)}
            out.append(TokenInfo(i, self.token_text(i), float(row[i]) if i < vocab else None, alts))
        return out

    def token_text(self, i: int) -> str:
        if i >= getattr(self.tok, "vocab_size", self.model.cfg.vocab_size):
            return f"<prompt vector {i}>"
        if hasattr(self.tok, "token_bytes"):
            return self.tok.token_bytes(i).decode("utf-8", errors="replace")
        return self.tok.decode([i])
