"""P-tuning (Liu et al. 2021, "GPT Understands, Too"), as HyperCLOVA used it.

N trainable embeddings pass through a small encoder (a bidirectional LSTM
then an MLP, or an MLP alone) and the resulting vectors take the place of
the ``{prompt}`` marks in a task template. The language model stays frozen:
gradients flow through it into its input embeddings and on to the encoder,
so only the encoder (a small file) is trained and saved. Classification is
trained with cross-entropy over the labels' verbalizer log-likelihoods, the
same scores `clova eval` compares; generation tasks with the log-likelihood
of the reference answer.
"""

from __future__ import annotations

import contextlib
import copy
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from clova_train import __version__
from clova_train.core.errors import ClovaError
from clova_train.evaluation.evaluate import run_task, sequence_logprobs
from clova_train.evaluation.prompts import FORMAT_VERSION, META_FILE, VECTORS_FILE, WEIGHTS_FILE, PromptEncoder, PromptTemplate, load_template, prepare, prompt_embedder
from clova_train.evaluation.tasks import SCORE_MODES, Example, Task, get_task, read_examples
from clova_train.inference.generate import model_device
from clova_train.model.gpt import GPT

ENCODERS = ("lstm", "mlp")


@dataclass
class PTuneConfig:
    """A p-tuning run."""

    task: str
    """One of evaluate.TASKS; its template needs a ptune_query."""
    train: str
    """Training examples, in the task's format."""
    valid: str
    """Validation examples; the epoch with the best first metric is kept."""
    out: str
    """Output directory: the encoder, its prompt vectors and ptune.json."""
    prompt_tokens: int = 8
    """Trained vectors, split evenly between the template's {prompt} marks."""
    encoder: str = "lstm"
    """lstm: embeddings -> bidirectional LSTM -> MLP (the paper's); mlp: embeddings -> MLP."""
    hidden_size: int = 256
    """Width of the encoder; the paper used the model's own width, which at 1.3B makes a 50M-parameter LSTM."""
    lr: float = 1e-3
    """AdamW learning rate of the encoder."""
    weight_decay: float = 0.0
    """AdamW weight decay of the encoder."""
    epochs: int = 5
    """Passes over the training examples."""
    batch_size: int = 8
    """Examples per optimizer step."""
    seed: int = 0
    """Seed of the encoder's initialisation and the example order."""
    template: str = ""
    """A template JSON file; empty: the one shipped for the task."""
    score: str = "sum"
    """How label log-likelihoods compare (as in `clova eval`): sum, or mean per token."""
    batch_tokens: int = 16384
    """Tokens per validation scoring batch."""

    def __post_init__(self) -> None:
        get_task(self.task)
        for name in ("train", "valid", "out"):
            if not getattr(self, name):
                raise ClovaError(f"ptune needs --{name}")
        if self.prompt_tokens < 1:
            raise ClovaError(f"prompt_tokens must be >= 1, not {self.prompt_tokens}")
        if self.encoder not in ENCODERS:
            raise ClovaError(f"encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}")
        if self.hidden_size < 2:
            raise ClovaError(f"hidden_size must be >= 2, not {self.hidden_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ClovaError(f"lr must be > 0 and weight_decay >= 0, not {self.lr} and {self.weight_decay}")
        if self.epochs < 1 or self.batch_size < 1 or self.batch_tokens < 1:
            raise ClovaError("epochs, batch_size and batch_tokens must be >= 1")
        if self.score not in SCORE_MODES:
            raise ClovaError(f"score must be one of {', '.join(SCORE_MODES)}, not {self.score!r}")


def _targets(tok, task: Task, template: PromptTemplate, examples, reserve: int) -> list[list[int]]:
    """Reference answer ids of generation-task examples, with the first stop string so the
    prompt also learns where an answer ends."""
    end = template.stop[0] if template.stop else ""
    texts = [template.answer_text(ex.gold[0]) + end for ex in examples]
    return [ids[:reserve] for ids in tok.encode_batch(texts)]


class LocalObjective:
    """The training loss and validation metrics of a prompt, computed with the model in this process.

    :func:`train_prompt` asks an objective for two things only, so the loss may come from
    elsewhere (the server's input-gradient API: ``studio.remote``) with the same loop.
    """

    def __init__(self, model: GPT, tok, task: Task, template: PromptTemplate, train: list[Example], valid: list[Example], cfg: PTuneConfig, *, model_name: str = ""):
        self.model, self.tok, self.task, self.template, self.valid, self.cfg = model, tok, task, template, valid, cfg
        self.n_embd, self.device = model.cfg.n_embd, model_device(model)
        self.base_model = {"name": model_name, **{k: getattr(model.cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")}}
        self.tokenizer_hash = getattr(tok, "hash", None)
        if task.by_likelihood:
            self.labels = list(template.verbalizers)
            texts = [template.answer_text(template.verbalizers[label]) for label in self.labels]
            self.cont_ids = tok.encode_batch(texts)
            reserve = max(map(len, self.cont_ids))
        else:
            reserve = template.max_new_tokens
        self.prepared = prepare(model, tok, task, template, train, n_vectors=cfg.prompt_tokens, reserve=reserve)
        self.targets = [] if task.by_likelihood else _targets(tok, task, template, train, reserve)

    def __len__(self) -> int:
        return len(self.prepared)

    def loss(self, indices: list[int], vectors: torch.Tensor) -> torch.Tensor:
        """The mean loss of training examples ``indices`` (differentiable with respect to ``vectors``)."""
        embed = prompt_embedder(self.model, vectors.to(self.model.wte.weight.dtype))
        batch = [self.prepared[i] for i in indices]
        if self.task.by_likelihood:
            requests = [(p.ids, c) for p in batch for c in self.cont_ids]
            logp = sequence_logprobs(self.model, requests, embed).view(len(batch), len(self.labels))  # (B, labels)
            if self.cfg.score == "mean":
                logp = logp / torch.tensor([len(c) for c in self.cont_ids], device=logp.device)
            gold = torch.tensor([self.labels.index(p.example.gold) for p in batch], device=logp.device)
            return F.cross_entropy(logp, gold)
        targets = [self.targets[i] for i in indices]
        logp = sequence_logprobs(self.model, [(p.ids, t) for p, t in zip(batch, targets)], embed)
        return -logp.sum() / sum(map(len, targets))

    def validate(self, vectors: torch.Tensor | None) -> dict[str, float]:
        """Metrics on the validation examples with ``vectors`` (None: the plain template, zero-shot)."""
        cfg = self.cfg
        return run_task(self.model, self.tok, self.task, self.template, self.valid, score=cfg.score, batch_tokens=cfg.batch_tokens, vectors=vectors)[0]

    @contextlib.contextmanager
    def frozen(self):
        """The model frozen and in eval mode while the prompt trains, as it was after."""
        model = self.model
        requires_grad = [p.requires_grad for p in model.parameters()]
        was_training = model.training
        model.requires_grad_(False)
        model.eval()
        try:
            yield
        finally:
            for p, flag in zip(model.parameters(), requires_grad):
                p.requires_grad_(flag)
            model.train(was_training)


def load_task(cfg: PTuneConfig) -> tuple[Task, PromptTemplate, list[Example], list[Example]]:
    """The task, its checked template, and the train and valid examples of a run."""
    task = get_task(cfg.task)
    template = load_template(task, cfg.template or None)
    if not template.ptune_query:
        raise ClovaError(f"the {task.name} template has no ptune_query: add one with {{prompt}} marks")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise ClovaError(f"{out}: exists and is not a ptune directory; choose another --out")
    return task, template, read_examples(task, cfg.train), read_examples(task, cfg.valid)


def ptune(model: GPT, tok, cfg: PTuneConfig, *, model_name: str = "", show_progress: bool = True, on_epoch=None, on_step=None) -> dict:
    """Train a prompt encoder in front of the frozen ``model``; save it to ``cfg.out``; return a report."""
    task, template, train, valid = load_task(cfg)
    objective = LocalObjective(model, tok, task, template, train, valid, cfg, model_name=model_name)
    return train_prompt(objective, cfg, task, template, show_progress=show_progress, on_epoch=on_epoch, on_step=on_step)


def train_prompt(
    objective,
    cfg: PTuneConfig,
    task: Task,
    template: PromptTemplate,
    *,
    show_progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> dict:
    """The p-tuning loop over any objective (:class:`LocalObjective` or a remote one); saves and reports.

    ``on_epoch(history entry)`` follows each validation, ``on_step(epoch, done, total)`` each step.
    """
    from clova_train.core.progress import progress_bar

    t0 = time.perf_counter()
    out = Path(cfg.out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = PromptEncoder(cfg.prompt_tokens, objective.n_embd, cfg.encoder, cfg.hidden_size)
    encoder = encoder.to(objective.device)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_rng = random.Random(cfg.seed)
    with objective.frozen():
        zero_shot = objective.validate(None)
        history, best, best_state = [], None, None
        primary = task.metrics[0]
        for epoch in range(1, cfg.epochs + 1):
            order = list(range(len(objective)))
            order_rng.shuffle(order)
            encoder.train()
            total = 0.0
            with progress_bar(f"ptune epoch {epoch}/{cfg.epochs}", len(order), enabled=show_progress) as advance:
                for b in range(0, len(order), cfg.batch_size):
                    idx = order[b : b + cfg.batch_size]
                    loss = objective.loss(idx, encoder())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
                    opt.step()
                    total += loss.item() * len(idx)
                    advance(len(idx))
                    if on_step:
                        on_step(epoch, b + len(idx), len(order))
            encoder.eval()
            with torch.no_grad():
                metrics = objective.validate(encoder())
            history.append({"epoch": epoch, "train_loss": total / len(order), "valid": metrics})
            if best is None or metrics[primary] > best["valid"][primary]:
                best, best_state = history[-1], copy.deepcopy(encoder.state_dict())
            if on_epoch:
                on_epoch(history[-1])
    encoder.load_state_dict(best_state)
    meta = {
        "format_version": FORMAT_VERSION,
        "clova_train_version": __version__,
        "task": task.name,
        "config": asdict(cfg),
        "encoder": {"n_tokens": cfg.prompt_tokens, "n_embd": objective.n_embd, "kind": cfg.encoder, "hidden_size": cfg.hidden_size},
        "template": asdict(template),
        "base_model": objective.base_model,
        "tokenizer_hash": objective.tokenizer_hash,
        "zero_shot": zero_shot,
        "best_epoch": best["epoch"],
        "best": best["valid"],
        "history": history,
    }
    _save(encoder, meta, out)
    return {
        "out": str(out),
        "zero_shot": zero_shot,
        "best": best["valid"],
        "best_epoch": best["epoch"],
        "history": history,
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "bytes": (out / WEIGHTS_FILE).stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


def _save(encoder: PromptEncoder, meta: dict, out: Path) -> None:
    """The encoder, its vectors (for anyone feeding them to another runtime) and ptune.json, atomically."""
    from safetensors.torch import save_file

    from clova_train.core.files import atomic_write_json, replace_dir, tmp_name

    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    with torch.no_grad():
        save_file({"vectors": encoder().float().cpu().contiguous()}, str(tmp / VECTORS_FILE))
    atomic_write_json(tmp / META_FILE, meta)
    replace_dir(tmp, out)

