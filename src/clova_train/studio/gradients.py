"""The input-gradient API: loss and d loss / d vectors for prompt vectors a client holds.

HyperCLOVA Studio's "input gradient API": a client trains its own prompt
encoder and never sees the weights. A request places its vectors between
text segments; each text segment, target and choice is encoded on its own
and the ids concatenated (as `clova eval` and `clova ptune` build them), so
vector j enters as id ``vocab_size + j`` through :func:`prompt_embedder`.
The loss is the mean over examples of the target's negative log-likelihood,
or of the cross-entropy over the choices' log-likelihoods; ``score`` says
whether a continuation's log-likelihood is summed or averaged per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clova_train.evaluation.evaluate import sequence_logprobs, token_batches
from clova_train.evaluation.prompts import prompt_embedder
from clova_train.evaluation.tasks import SCORE_MODES
from clova_train.inference.api import ApiError
from clova_train.inference.generate import model_device

MAX_EXAMPLES = 64
"""Examples one request may carry."""
MAX_VECTORS = 256
"""Prompt vectors one request may carry (k)."""
MAX_CHOICES = 32
"""Choices one example may carry."""
MAX_TOKENS = 16384
"""Tokens one request may cost: every scored sequence (context + target, or context + each choice) counted."""
BATCH_TOKENS = 8192
"""Padded tokens per forward pass; a request is split into passes and differentiated once."""
FIELDS = ("vectors", "examples", "score", "grad")


def _bad(message: str, param: str | None = None, code: str = "invalid_gradient_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Example:
    """One example as ids: the context (vector j as id base + j) and its continuations."""

    context: list[int]
    continuations: list[list[int]]
    gold: int | None
    """The right choice's index; None: a target example (one continuation, its NLL is the loss)."""


@dataclass
class GradientRequest:
    vectors: torch.Tensor
    """(k, d_model) float64, as sent."""
    examples: list[Example]
    score: str
    grad: bool
    tokens: int


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{param} must be a string, not {type(value).__name__}", param)
    return value


def _vectors(value, width: int) -> torch.Tensor:
    if not isinstance(value, list):
        raise _bad("vectors must be a list of vectors (lists of numbers)", "vectors")
    if len(value) > MAX_VECTORS:
        raise _bad(f"{len(value)} vectors; this server accepts at most {MAX_VECTORS} per request", "vectors", "too_many_vectors")
    for i, v in enumerate(value):
        if not isinstance(v, list) or len(v) != width:
            got = f"{len(v)} numbers" if isinstance(v, list) else type(v).__name__
            raise _bad(f"vectors.{i} has {got}; this model's width (d_model) is {width}", f"vectors.{i}", "wrong_vector_width")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise _bad(f"vectors.{i} holds {x!r}; vectors hold numbers only", f"vectors.{i}")
            if not math.isfinite(x):
                raise _bad(f"vectors.{i} holds {x}; every number must be finite", f"vectors.{i}", "non_finite")
    return torch.tensor(value, dtype=torch.float64).reshape(len(value), width)


def parse_request(body, *, width: int, base: int, context: int, encode, check=None) -> GradientRequest:
    """The request checked and encoded, or a 400 naming what is wrong and the limit.

    ``base`` is the model's vocabulary size (vector j becomes id base + j), ``encode``
    the tokenizer's batch encoder, ``context`` the longest sequence the model reads,
    ``check(text, param)`` the server's input filter.
    """
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; this endpoint accepts {', '.join(FIELDS)}", unknown[0], "unknown_field")
    for name in ("vectors", "examples"):
        if name not in body:
            raise _bad(f"{name} is required", name)
    vectors = _vectors(body["vectors"], width)
    score = body.get("score", "sum")
    if score not in SCORE_MODES:
        raise _bad(f"score must be one of {', '.join(SCORE_MODES)}, not {score!r}", "score")
    grad = body.get("grad", True)
    if not isinstance(grad, bool):
        raise _bad("grad must be true or false", "grad")
    examples = body["examples"]
    if not isinstance(examples, list) or not examples:
        raise _bad("examples must be a non-empty list", "examples")
    if len(examples) > MAX_EXAMPLES:
        raise _bad(f"{len(examples)} examples; this server accepts at most {MAX_EXAMPLES} per request: split them", "examples", "too_many_examples")
    # Every text is encoded in one batch; a piece is a text (its position in `texts`) or a vector id.
    texts: list[str] = []
    shapes = []
    for e, ex in enumerate(examples):
        where = f"examples.{e}"
        if not isinstance(ex, dict):
            raise _bad(f"{where} must be an object with segments and a target or choices", where)
        extra = sorted(set(ex) - {"segments", "target", "choices", "gold"})
        if extra:
            raise _bad(f"{where} has unknown field {extra[0]!r}; an example has segments and target, or choices and gold", f"{where}.{extra[0]}", "unknown_field")
        segments = ex.get("segments")
        if not isinstance(segments, list) or not segments:
            raise _bad(f"{where}.segments must be a non-empty list of texts and vector indices", f"{where}.segments")
        pieces = []
        for s, seg in enumerate(segments):
            if isinstance(seg, str):
                if check:
                    check(seg, f"{where}.segments.{s}")
                pieces.append(("text", len(texts)))
                texts.append(seg)
            elif isinstance(seg, int) and not isinstance(seg, bool):
                if not 0 <= seg < len(vectors):
                    have = f"has {len(vectors)} vectors (0..{len(vectors) - 1})" if len(vectors) else "has no vectors"
                    raise _bad(f"{where}.segments.{s} is vector {seg}, but the request {have}", f"{where}.segments.{s}", "index_out_of_range")
                pieces.append(("vector", seg))
            else:
                raise _bad(f"{where}.segments.{s} must be a text or a vector index, not {seg!r}", f"{where}.segments.{s}")
        if ("target" in ex) == ("choices" in ex):
            raise _bad(f"{where} needs either a target or choices (with gold)", where)
        if "target" in ex:
            if "gold" in ex:
                raise _bad(f"{where}: gold goes with choices, not with a target", f"{where}.gold")
            conts = [_text(ex["target"], f"{where}.target")]
            gold = None
        else:
            choices = ex["choices"]
            if not isinstance(choices, list) or not choices:
                raise _bad(f"{where}.choices must be a non-empty list of texts", f"{where}.choices", "empty_choices")
            if len(choices) > MAX_CHOICES:
                raise _bad(f"{where} has {len(choices)} choices; this server accepts at most {MAX_CHOICES}", f"{where}.choices", "too_many_choices")
            conts = [_text(c, f"{where}.choices.{i}") for i, c in enumerate(choices)]
            gold = ex.get("gold")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise _bad(f"{where}.gold must be the index of the right choice (0..{len(choices) - 1}), not {gold!r}", f"{where}.gold", "gold_out_of_range")
        shapes.append((pieces, len(texts), gold))
        texts += conts
    encoded = encode(texts)
    parsed, tokens = [], 0
    for e, (pieces, first_cont, gold) in enumerate(shapes):
        ids: list[int] = []
        for kind, value in pieces:
            ids += encoded[value] if kind == "text" else [base + value]
        n_conts = 1 if gold is None else len(examples[e]["choices"])
        conts = encoded[first_cont : first_cont + n_conts]
        if not ids:
            raise _bad(f"examples.{e}.segments encode to no tokens; give some text or a vector", f"examples.{e}.segments")
        for c, cont in enumerate(conts):
            name = f"examples.{e}.target" if gold is None else f"examples.{e}.choices.{c}"
            if not cont:
                raise _bad(f"{name} encodes to no tokens", name)
            if len(ids) + len(cont) > context:
                raise _bad(f"examples.{e}: {len(ids)} context and {len(cont)} continuation tokens exceed the model's context of {context}", name, "context_length_exceeded")
            tokens += len(ids) + len(cont)
        parsed.append(Example(ids, conts, gold))
    if tokens > MAX_TOKENS:
        raise _bad(f"the request scores {tokens} tokens (contexts counted once per choice); this server accepts at most {MAX_TOKENS}: send fewer examples", "examples", "too_many_tokens")
    return GradientRequest(vectors, parsed, score, grad, tokens)


def input_gradients(model, reqs: list[GradientRequest]) -> list[dict]:
    """``{"loss", "grad", "scores", "tokens"}`` of each parsed request; the model stays frozen.

    Requests queued together share the forward passes and one backward pass: their vectors are
    stacked in one table (request r's vector j is row offset_r + j), and since no request's rows read
    another's vectors, the gradient of the summed losses with respect to a request's vectors is
    the gradient of its own loss.
    """
    device, base = model_device(model), model.cfg.vocab_size
    vectors = [r.vectors.to(device=device, dtype=model.wte.weight.dtype).requires_grad_(r.grad and len(r.vectors) > 0) for r in reqs]
    flat: list[tuple[list[int], list[int]]] = []
    offset = 0
    for req, v in zip(reqs, vectors):
        for ex in req.examples:
            context = [i + offset if i >= base else i for i in ex.context]
            flat += [(context, cont) for cont in ex.continuations]
        offset += len(v)
    embed = prompt_embedder(model, torch.cat(vectors)) if offset else None
    logp: list[torch.Tensor] = [None] * len(flat)  # type: ignore[list-item]
    with torch.enable_grad() if any(v.requires_grad for v in vectors) else torch.no_grad():
        for batch in token_batches([len(c) + len(x) for c, x in flat], BATCH_TOKENS):
            for i, lp in zip(batch, sequence_logprobs(model, [flat[i] for i in batch], embed)):
                logp[i] = lp
        losses, scores, at = [], [], 0
        for req in reqs:
            mine_losses, mine_scores = [], []
            for ex in req.examples:
                mine = torch.stack(logp[at : at + len(ex.continuations)])
                at += len(ex.continuations)
                if req.score == "mean":
                    mine = mine / torch.tensor([len(c) for c in ex.continuations], device=device)
                mine_scores.append(mine)
                mine_losses.append(-mine[0] if ex.gold is None else F.cross_entropy(mine[None], torch.tensor([ex.gold], device=device)))
            losses.append(torch.stack(mine_losses).mean())
            scores.append(mine_scores)
        wanted = [v for v in vectors if v.requires_grad]
        total = sum(loss for loss in losses if loss.requires_grad)
        grads = iter(torch.autograd.grad(total, wanted) if wanted else [])
    out = []
    for req, v, loss, mine in zip(reqs, vectors, losses, scores):
        grad = next(grads) if v.requires_grad else torch.zeros_like(v)
        out.append({
            "loss": loss.item(),
            "grad": grad.float().cpu().tolist() if req.grad else None,
            "scores": [s.tolist() if ex.gold is not None else s[0].item() for s, ex in zip(mine, req.examples)],
            "tokens": req.tokens,
        })  # fmt: skip
    return out
