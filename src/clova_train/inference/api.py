"""The OpenAI request bodies the server accepts, its errors, the chat template, and the response bodies.

Chat template for a base model (no instruction tuning, no special tokens):
each system message's content on its own paragraph, then one line per
message ``사용자: {content}`` (user) or ``AI: {content}`` (assistant; a
message's ``name`` replaces its role's label, which is how a character bot
names its character), then the label of the turn to generate, ``AI:``
(or the last assistant ``name``). Generation stops before any of the labels
starts a new line, and the reply's leading whitespace is dropped::

    너는 친절한 상담원이다.

    사용자: 안녕하세요
    AI:
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

USER_LABEL = "사용자"
ASSISTANT_LABEL = "AI"
MAX_N = 16
# Most completions (prompts times n) one request may ask for.
MAX_CHOICES = 64
MAX_LOGPROBS = 20
# Stop sequences are searched for at every generated token: their number and length are bounded.
MAX_STOPS = 16
MAX_STOP_CHARS = 256

FINISH = {"eod": "stop", "stop": "stop", "length": "length", "filtered": "content_filter"}


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    """Token id (as a string, OpenAI's form) -> bias added to its logit before sampling, -100..100."""
    # Accepted so that clients that always send them work; only 0 (off) is implemented.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    """Sample this many per prompt and return the ``n`` with the highest total log-probability (vLLM's ranking)."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    """Text, or a list of text parts (newer clients' form), joined."""
    name: Optional[str] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


def load_json(raw: bytes):
    """The request body's JSON, or a 400: invalid JSON, nesting deeper than Python's parser goes, or a string
    that is not Unicode text (a lone surrogate such as ``"\\ud800"``, which JSON's escapes allow but UTF-8
    cannot encode)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply", code="invalid_json") from None
    _check_text(data)
    return data


def _check_text(data) -> None:
    """A 400 naming the first string (key or value) holding a lone surrogate."""
    todo: list[tuple[str, object]] = [("", data)]  # iterative: the JSON may nest as deep as the parser allowed
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_str(k, where or None)
                todo.append((f"{where}.{k}" if where else k, v))
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}", v) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
        elif isinstance(value, str):
            _check_str(value, where or None)


def _check_str(text: str, where: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"{where or 'the body'}: character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X}), "
            "which is not text; send valid UTF-8", param=where, code="invalid_text",
        ) from None  # fmt: skip


def parse(cls: type[BaseModel], data) -> BaseModel:
    """The request body as ``cls``, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            raise ApiError(400, f"unknown field {param!r}; this server accepts {known}", param=param, code="unknown_field") from None
        raise ApiError(400, f"{param}: {err['msg']}", param=param) from None
    if isinstance(req, _Sampling):  # the studio's bodies (jobs, presets) are not sampling requests
        _check_sampling(req)
    return req


def _check_sampling(req: _Sampling) -> None:
    """What one field's own bounds cannot say: unsupported values, limits across fields."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported by this server (only 0)", param=name)
    stops = req.stops()
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences of at most {MAX_STOP_CHARS} characters", param="stop")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of < req.n:
        raise ApiError(400, f"best_of {best_of} must be at least n ({req.n})", param="best_of")
    if best_of is not None and best_of > req.n and req.stream:
        raise ApiError(400, "best_of above n picks among finished completions, so it cannot stream; ask without stream", param="best_of")
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit() or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias: {key!r}: {bias} must map a token id to a bias in -100..100", param="logit_bias")
    wants_logprobs = getattr(req, "logprobs", None)
    if req.stream and wants_logprobs is not None and wants_logprobs is not False:
        raise ApiError(400, "logprobs are not streamed by this server; ask without stream", param="logprobs")


def chat_prompt(messages: list[Message]) -> tuple[str, list[str]]:
    """(prompt text, stop strings) of the plain chat template in this module's docstring."""
    system = [m.text.strip() for m in messages if m.role == "system"]
    lines, labels = [], {USER_LABEL, ASSISTANT_LABEL}
    reply_label = ASSISTANT_LABEL
    for m in messages:
        if m.role == "system":
            continue
        label = m.name or (USER_LABEL if m.role == "user" else ASSISTANT_LABEL)
        labels.add(label)
        if m.role == "assistant" and m.name:
            reply_label = m.name
        lines.append(f"{label}: {m.text.strip()}")
    text = "".join(s + "\n\n" for s in system) + "".join(line + "\n" for line in lines) + f"{reply_label}:"
    return text, [f"\n{label}:" for label in sorted(labels)]


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens, start_offset: int) -> dict:
    """The legacy completions ``logprobs`` object: tokens, their log-probabilities, alternatives, offsets."""
    offsets, at = [], start_offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top or None for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens) -> dict:
    def entry(text: str, lp: float | None) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(k, v) for k, v in t.top.items()]} for t in tokens
        ]
    }


def envelope(kind: str, rid: str, model: str, choices: list, usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
