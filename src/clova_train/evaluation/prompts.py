"""Prompts: the editable JSON templates, building a task's prompts from them, and trained (p-tuned) prompt vectors.

P-tuning's trained vectors enter a prompt as ids past the vocabulary
(``model.cfg.vocab_size + j`` is vector j), which :func:`prompt_embedder`
swaps for the vectors; everything else treats them as ordinary ids.
Evaluation and p-tuning both import this module; evaluation never imports p-tuning.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from clova_train.core.config import from_dict
from clova_train.core.errors import ClovaError
from clova_train.inference.generate import model_device
from clova_train.model.gpt import GPT
from clova_train.evaluation.tasks import Example, Task

TEMPLATES = Path(__file__).parent / "resources" / "templates"
PROMPT_MARK = "{prompt}"
WEIGHTS_FILE = "prompt_encoder.safetensors"
VECTORS_FILE = "prompt_vectors.safetensors"
META_FILE = "ptune.json"
FORMAT_VERSION = 1


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
        for name in ("query", "answer", "instruction", "separator", "ptune_query", "description"):
            if not isinstance(getattr(self, name), str):
                raise ClovaError(f"template {name} must be a string, not {type(getattr(self, name)).__name__}")
        if not isinstance(self.verbalizers, dict) or not all(isinstance(w, str) for w in self.verbalizers.values()):
            raise ClovaError(f"template verbalizers must map each label to a string (the word scored), not {self.verbalizers!r}")
        if not isinstance(self.stop, list) or not all(isinstance(w, str) for w in self.stop):
            raise ClovaError(f"template stop must be a list of strings, not {self.stop!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise ClovaError(f"template max_new_tokens must be an integer, not {self.max_new_tokens!r}")
        for name in ("query", "answer", "instruction", "separator", "ptune_query"):
            _fields(getattr(self, name))  # only plain {field} placeholders, anywhere
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
    """The {field} names in ``text``; a format spec, conversion, index or attribute is refused (it could ask
    str.format for a 50 MB pad or reach into objects)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ClovaError(f"template text {text!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (spec or conversion or not name.isidentifier()):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ClovaError(f"template text uses {shown}: only plain {{field}} placeholders are allowed (no format specs, conversions or indexing)")
    return {name for _, name, _, _ in parsed if name is not None}


def template_path(task: Task) -> Path:
    return TEMPLATES / f"{task.name}.json"


def load_template(task: Task, path: str | Path | None = None) -> PromptTemplate:
    """The task's template from ``path``, or the one shipped with the package; checked against the task."""
    from clova_train.core.config import load_json

    path = Path(path) if path else template_path(task)
    try:
        template = load_json(PromptTemplate, path)
    except ClovaError as e:  # the dataclass's own checks do not know the file
        raise e if str(e).startswith(str(path)) else ClovaError(f"{path}: {e}") from None
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


def prompt_pieces(template: PromptTemplate, task: Task, example: Example, demos: list[Example], n_vectors: int) -> list[str | int]:
    """A prompt as text pieces and vector counts: instruction, demonstrations, then the (p-tuning) query."""
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
    pieces = [prompt_pieces(template, task, ex, d, n_vectors) for ex, d in zip(examples, demos)]
    ids = encode_pieces(tok, pieces, model.cfg.vocab_size)
    for i, ex in enumerate(examples):
        while len(ids[i]) > limit and demos[i]:
            demos[i] = demos[i][1:]
            pieces[i] = prompt_pieces(template, task, ex, demos[i], n_vectors)
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


class PromptEncoder(nn.Module):
    """Prompt vectors (n_tokens, n_embd) = MLP(BiLSTM(E)) or MLP(E), E trainable (n_tokens, hidden)."""

    def __init__(self, n_tokens: int, n_embd: int, kind: str = "lstm", hidden_size: int = 256):
        super().__init__()
        hidden = hidden_size
        self.kind = kind
        self.embedding = nn.Parameter(torch.randn(n_tokens, hidden))
        # The LSTM makes neighbouring vectors depend on each other (the paper's argument for it).
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        width = 2 * (hidden // 2) if self.lstm is not None else hidden
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_embd))
        # Vectors start at zero rather than several times the size of word embeddings, which
        # would drown what the prompt reads from the input in the residual stream.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (1, n, hidden) -> (n, hidden)
        return self.mlp(x)  # (n_tokens, n_embd)


@dataclass
class TrainedPrompt:
    """A loaded p-tuning directory."""

    template: PromptTemplate
    vectors: torch.Tensor
    """(prompt_tokens, n_embd) on the model's device, in its dtype."""
    meta: dict


def load_prompt(path: str | Path, model: GPT, task: Task) -> TrainedPrompt:
    """The trained prompt of a `clova ptune` directory, checked against the model and task."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ClovaError(f"{path}: not a ptune directory (needs {META_FILE} and {WEIGHTS_FILE}); make one with `clova ptune`")
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClovaError(f"{path / META_FILE}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    if meta["task"] != task.name:
        raise ClovaError(f"{path}: the prompt was trained for {meta['task']}, not {task.name}; pass --task {meta['task']}")
    enc = meta["encoder"]
    if enc["n_embd"] != model.cfg.n_embd:
        raise ClovaError(f"{path}: the prompt was trained for a model with n_embd {enc['n_embd']}, this one has {model.cfg.n_embd}")
    encoder = PromptEncoder(enc["n_tokens"], enc["n_embd"], enc["kind"], enc["hidden_size"])
    encoder.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    with torch.no_grad():
        vectors = encoder.eval()().to(device=model_device(model), dtype=model.wte.weight.dtype)
    template = from_dict(PromptTemplate, meta["template"], where=f"{path / META_FILE} template")
    template.check(task, str(path / META_FILE))
    return TrainedPrompt(template, vectors, meta)
