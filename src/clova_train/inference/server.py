"""`clova serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) and the prompt playground.

The event loop only reads bodies (up to a size set by the model's context) and relays answers. Each
request is prepared on one preparation thread (JSON, strict bodies, the
input filter, tokenizing: counts and sizes first, so the work is bounded
before it starts), then queued for :class:`~clova_train.inference.scheduler.Scheduler`'s
bounded workers, which run the project's own KV-cache generation with the
output filter's words masked at sampling. So ``/health`` answers while any
one request is read, prepared or generated. Every error is an OpenAI-style
JSON body with a 4xx code, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from clova_train.core.errors import ClovaError
from clova_train.inference import api
from clova_train.inference.api import ApiError, ChatRequest, CompletionRequest
from clova_train.inference.filters import FilterStore
from clova_train.inference.generate import GenerateConfig, model_text
from clova_train.inference.metrics import Metrics
from clova_train.inference.presets import load_presets
from clova_train.inference.scheduler import Cancelled, Job, QueueFull, Scheduler
from clova_train.tokenizer.bpe import token_repr

PLAYGROUND = Path(__file__).parent / "playground"
STATIC = {"index.html": "text/html; charset=utf-8", "style.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "ptune.html": "text/html; charset=utf-8", "ptune.js": "text/javascript; charset=utf-8"}
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/presets", "/v1/tokenize", "/v1/completions", "/v1/chat/completions",
             "/v1/ptune", "/v1/ptune/gradients", "/v1/ptune/templates", "/v1/ptune/jobs")
CHAT_MAX_TOKENS = 256
# Request bodies are refused before they are read whole above room for 64 full contexts of token ids at 16 bytes
# each (1 MiB at least: a prompt of max_prompt_chars' default, JSON-escaped; 8 MiB at most). JSON parsing holds
# Python's lock, so this also bounds how long /health can wait for one body to parse.
BYTES_PER_TOKEN = 16
MIN_BODY_BYTES, MAX_BODY_BYTES = 1 << 20, 8 << 20
log = logging.getLogger("clova.serve")
# One line per request (client, method, path, status, seconds to the last byte), as uvicorn's and
# vLLM's access logs print; `clova serve` shows it on stderr.
request_log = logging.getLogger("clova.serve.requests")


@dataclass
class ServeConfig:
    """How `clova serve` listens and what it allows."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port."""
    api_key: str = ""
    """Clients must send ``Authorization: Bearer KEY`` to /v1/* (empty: no key)."""
    filters: str = ""
    """The input/output filter JSON file (reloaded when it changes); empty: no filters."""
    workers: int = 1
    """Generation threads; each runs one batch at a time."""
    max_queue: int = 256
    """Requests waiting beyond this get 429."""
    presets: str = ""
    """A folder of the user's own playground presets (*.json), besides the shipped ones."""
    model_name: str = ""
    """The name /v1/models reports and requests may give (empty: the model directory's name)."""
    public_metrics: bool = False
    """Serve /metrics without the API key (for a scraper that cannot send one)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ClovaError(f"port must be in 0..65535, not {self.port}")
        if self.workers < 1 or self.max_queue < 1:
            raise ClovaError("workers and max_queue must be >= 1")


class Server:
    """The model, tokenizer, filters, scheduler and counters behind the routes."""

    def __init__(self, model, tok, cfg: ServeConfig, *, embed=None, encode: Callable[[list[str]], list[list[int]]] | None = None):
        self.model, self.tok, self.cfg = model, tok, cfg
        # Frozen: input gradients and p-tuning jobs differentiate through it, never into its weights.
        model.requires_grad_(False)
        # Set by the studio (p-tuned prompts served under their own model names); None: the base model only.
        self.studio = None
        self.name = cfg.model_name or "clova"
        self.context = model.cfg.block_size
        self.vocab = getattr(tok, "vocab_size", model.cfg.vocab_size)
        self.max_body = min(MAX_BODY_BYTES, max(MIN_BODY_BYTES, api.MAX_CHOICES * self.context * BYTES_PER_TOKEN))
        self.encode = encode or tok.encode_batch
        self.seen = partial(model_text, tok)
        # One thread prepares requests: the tokenizer's caches and MeCab's tagger are not shared between threads.
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="clova-prep")
        self.filters = FilterStore(cfg.filters or None)
        self.presets = load_presets(cfg.presets or None)
        self.static = {n: (PLAYGROUND / n).read_bytes() for n in STATIC}
        self.metrics = m = Metrics()
        m.describe("clova_requests_total", "counter", "HTTP requests by endpoint and status code.")
        m.describe("clova_request_seconds", "histogram", "Time from request to the end of the response (streams included).")
        m.describe("clova_filter_rejections_total", "counter", "Requests refused by the filters, by reason.")
        m.describe("clova_generated_tokens_total", "counter", "Tokens generated.")
        self.scheduler = Scheduler(
            model, tok, workers=cfg.workers, max_queue=cfg.max_queue, embed=embed,
            on_tokens=lambda n: m.inc("clova_generated_tokens_total", n),
        )  # fmt: skip
        m.gauge("clova_queued_requests", lambda: self.scheduler.queued)
        m.gauge("clova_busy_workers", lambda: self.scheduler.busy)
        m.gauge("clova_cancelled_requests", lambda: self.scheduler.cancelled)
        m.gauge("clova_batched_requests", lambda: self.scheduler.batched)
        m.gauge("clova_filter_reload_errors", lambda: self.filters.reload_errors)

    # ------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if not self.cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.cfg.api_key.encode()):
            raise ApiError(401, "incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def reject(self, reason: str, message: str, param: str | None = None, code: str = "") -> ApiError:
        """A filter's refusal, counted by reason."""
        self.metrics.inc("clova_filter_rejections_total", reason=reason)
        return ApiError(400, message, param=param, code=code or ("prompt_too_long" if reason.startswith("prompt_") else "input_filtered"))

    def prompt_ids(self, prompt, param: str = "prompt", n: int = 1, encode=None) -> tuple[list[list[int]], list[str]]:
        """(ids, text) of each prompt after the input filter; token-id prompts are decoded for it. ``encode``: a
        served trained prompt's (which wraps each text around its vectors); None: the server's own.

        Counts and sizes are checked before the work that grows with them (decoding, cleaning, tokenizing).
        """
        filters = self.filters.current()
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            texts, ids = ([prompt] if isinstance(prompt, str) else list(prompt)), None
        else:
            ids = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
        count = len(texts if ids is None else ids)
        if not count:
            raise ApiError(400, "prompt must not be an empty list", param=param)
        if count * n > api.MAX_CHOICES:
            raise ApiError(400, f"{count} prompts with n={n} make more than {api.MAX_CHOICES} completions; split the request", param="n")
        if ids is None:
            for text in texts:
                if hit := filters.check_size(text):
                    raise self.reject(hit[0], hit[1], param)
        else:
            if any(not p for p in ids):
                raise ApiError(400, "a prompt of token ids must not be empty", param=param)
            for p in ids:
                self._check_tokens(len(p), filters.max_prompt_tokens, param)
            if any(not 0 <= i < self.vocab for p in ids for i in p):
                raise ApiError(400, f"token ids must be in 0..{self.vocab - 1}", param=param)
            texts = [self.tok.decode(p) for p in ids]
        for text in texts:
            if hit := filters.check_input(text, self.seen):
                raise self.reject(hit[0], hit[1], param)
        if ids is None:
            ids = [p or [self.tok.eod_id] for p in (encode or self.encode)(texts)]
            for p in ids:
                self._check_tokens(len(p), filters.max_prompt_tokens, param)
        return ids, texts

    def _check_tokens(self, n: int, limit: int, param: str) -> None:
        if limit and n > limit:
            raise self.reject("prompt_tokens", f"the prompt has {n} tokens; this server accepts at most {limit}", param)
        if n >= self.context:
            raise ApiError(
                400, f"the prompt has {n} tokens; the model's context is {self.context} tokens",
                param=param, code="context_length_exceeded",
            )  # fmt: skip

    def check_echo(self, texts: list[str]) -> None:
        """Echo returns the prompt: refuse it when a word the output filter bans stands there (as generation
        matches it: on the text the model reads)."""
        banned = [self.seen(w) for w in self.filters.current().output_banned_words]
        if any(w in self.seen(t) for t in texts for w in banned):
            raise self.reject(
                "echo_banned", "the prompt holds a word the output filter bans, and echo would return it; ask without echo",
                "echo", code="output_filtered",
            )  # fmt: skip

    def generate_config(self, req, ids: list[list[int]], max_tokens: int, extra_stop: list[str]) -> GenerateConfig:
        filters = self.filters.current()
        if filters.max_tokens and max_tokens > filters.max_tokens:
            raise self.reject("max_tokens", f"max_tokens {max_tokens} is above this server's limit of {filters.max_tokens}", "max_tokens", code="max_tokens_too_large")
        longest = max(map(len, ids))
        if longest + max_tokens > self.context:
            raise ApiError(
                400, f"the prompt has {longest} tokens and max_tokens is {max_tokens}: together above the model's "
                f"context of {self.context} tokens; lower max_tokens to {self.context - longest} or less",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        if any(not 0 <= int(t) < self.vocab for t in req.logit_bias or {}):
            raise ApiError(400, f"logit_bias: token ids must be in 0..{self.vocab - 1}", param="logit_bias")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            return GenerateConfig(
                max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                stop=req.stops() + extra_stop, banned_words=list(filters.output_banned_words), batch_size=len(ids) * self.copies(req),
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            )  # fmt: skip
        except ClovaError as e:
            raise ApiError(400, str(e)) from None

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on the preparation thread, so the event loop (and /health) never waits for it."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    async def respond(self, build: Callable[[], dict]) -> Response:
        """A JSON response whose body is built and serialised on the preparation thread (a tokenized prompt or
        64 completions with log-probabilities is megabytes of JSON)."""
        body = await self.off_loop(lambda: _dumps(build()).encode())
        return Response(body, media_type="application/json")

    @staticmethod
    def copies(req) -> int:
        """Completions sampled per prompt: ``best_of`` when asked, else ``n``."""
        return getattr(req, "best_of", None) or req.n

    async def run(self, job: Job, request: Request):
        """The job's result; a client that disconnects first has its job cancelled, freeing the worker."""
        try:
            done = asyncio.wrap_future(self.scheduler.submit(job))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error", code="queue_full") from None
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():
            self.scheduler.cancel(job)
            done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" noise
            raise ApiError(499, "the client closed the request", code="client_closed")
        return done.result()

    def prepare_completion(self, raw: bytes):
        """(request, ids, texts, config, embed); ``embed`` is a served trained prompt's when the model names one."""
        req: CompletionRequest = api.parse(CompletionRequest, api.load_json(raw))
        embed, encode = _check_model(self, req.model, prompts=True)
        ids, texts = self.prompt_ids(req.prompt, n=self.copies(req), encode=encode)
        if req.echo:
            self.check_echo(texts)
        return req, ids, texts, self.generate_config(req, ids, req.max_tokens, []), embed

    def prepare_chat(self, raw: bytes):
        req: ChatRequest = api.parse(ChatRequest, api.load_json(raw))
        _check_model(self, req.model)
        filters = self.filters.current()
        text, stops = api.chat_prompt(req.messages)
        if hit := filters.check_size(text):  # the whole chat first: each message is filtered below
            raise self.reject(hit[0], hit[1], "messages")
        for i, m in enumerate(req.messages):
            if hit := filters.check_input(m.text, self.seen):
                raise self.reject(hit[0], hit[1], f"messages.{i}.content")
        ids, _ = self.prompt_ids(text, "messages")
        room = self.context - len(ids[0])
        max_tokens = req.max_completion_tokens or req.max_tokens or min(CHAT_MAX_TOKENS, room, filters.max_tokens or room)
        return req, ids, self.generate_config(req, ids, max_tokens, stops)

    def prepare_tokenize(self, raw: bytes) -> dict:
        body = api.load_json(raw)
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
            raise ApiError(400, 'the body must be {"text": "..."}', param="text")
        text = body["text"]
        if hit := self.filters.current().check_size(text):
            raise self.reject(hit[0], hit[1], "text")
        tok = self.tok
        pieces = tok.segment(text) if hasattr(tok, "segment") else [text]
        rows = []
        for piece, ids in zip(pieces, tok.encode_batch(pieces) if pieces else []):
            # Shown as `clova tokenizer show` shows them: escaped, a partial character as its bytes.
            shown = [token_repr(tok.token_bytes(i)) if hasattr(tok, "token_bytes") else repr(self.scheduler.token_text(i))[1:-1] for i in ids]
            rows.append({"morpheme": piece, "ids": ids, "tokens": shown})
        return {"morphemes": rows, "tokens": len(tok.encode(text)) if text else 0}


# ---------------------------------------------------------------- routes


async def _body(server: Server, request: Request, limit: int = 0) -> bytes:
    """The raw body, refused past ``limit`` (default ``server.max_body``) before it is read whole; parsed on the
    preparation thread."""
    limit = limit or server.max_body
    too_large = ApiError(413, f"the request body is larger than this server's {limit >> 10} KiB", code="body_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body was read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _dumps(obj, depth: int = 3) -> str:
    """Compact JSON, one ``json.dumps`` per item of the outer ``depth`` levels: the encoder holds Python's lock for
    a whole call, and one call over a megabyte would stall the event loop's thread as long."""
    if depth and isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + _dumps(v, depth - 1) for k, v in obj.items()) + "}"
    if depth and isinstance(obj, list):
        return "[" + ",".join(_dumps(v, depth - 1) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _route(fn):
    """Every failure becomes an OpenAI-style error body; the server itself never falls over."""

    async def handler(request: Request) -> Response:
        server: Server = request.app.state.server
        try:
            if request.url.path.startswith("/v1/"):
                server.authorize(request)
            return await fn(server, request)
        except ApiError as e:
            return _error(e)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    return handler


class _SSE(StreamingResponse):
    """A server-sent-events stream that runs ``on_close`` however it ends (done, error, client gone)."""

    def __init__(self, body, on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _choices(n_prompts: int, n: int) -> list[tuple[int, int]]:
    """(choice index, prompt index) of every completion, prompts' copies adjacent."""
    return [(p * n + j, p) for p in range(n_prompts) for j in range(n)]


def _best_of(result, n_prompts: int, k: int, n: int, *, keep_logprobs: bool):
    """The ``n`` of each prompt's ``k`` completions with the highest total log-probability, in that order."""
    completions, tokens = [], []
    for p in range(n_prompts):
        mine = range(p * k, (p + 1) * k)
        score = {i: sum(t.logprob for t in result.tokens[i] if t.logprob is not None) for i in mine}
        for i in sorted(mine, key=lambda i: -score[i])[:n]:
            completions.append(result.completions[i])
            tokens.append(result.tokens[i])
    return replace(result, completions=completions, tokens=tokens if keep_logprobs else None)


@_route
async def completions(server: Server, request: Request) -> Response:
    req, ids, texts, cfg, embed = await server.off_loop(server.prepare_completion, await _body(server, request))
    k = server.copies(req)
    ranked = k > req.n  # best_of: the sampled tokens' log-probabilities rank the candidates
    logprobs = req.logprobs if not ranked else req.logprobs or 0
    job = Job([p for p in ids for _ in range(k)], cfg, logprobs=logprobs, echo=req.echo, embed=embed)
    rid, n_prompt = api.new_id("cmpl"), sum(len(p) for p in ids)
    if req.stream:
        first = [{"text": texts[p], "index": c, "logprobs": None, "finish_reason": None} for c, p in _choices(len(ids), req.n)] if req.echo else []
        return _stream(server, job, req, "text_completion", rid, n_prompt, first, lambda i, t: {"text": t, "index": i, "logprobs": None})
    result = await server.run(job, request)
    if ranked:
        result = _best_of(result, len(ids), k, req.n, keep_logprobs=req.logprobs is not None)

    def body() -> dict:
        choices = []
        for (c, p), comp in zip(_choices(len(ids), req.n), result.completions):
            text = (texts[p] if req.echo else "") + comp.text
            lp = api.completion_logprobs(result.tokens[c], 0) if result.tokens is not None else None
            choices.append({"text": text, "index": c, "logprobs": lp, "finish_reason": api.FINISH[comp.finish_reason]})
        used = sum(len(c.token_ids) for c in result.completions)
        return api.envelope("text_completion", rid, server.name, choices, api.usage(n_prompt, used))

    return await server.respond(body)


@_route
async def chat_completions(server: Server, request: Request) -> Response:
    req, ids, cfg = await server.off_loop(server.prepare_chat, await _body(server, request))
    top = (req.top_logprobs or 0) if req.logprobs else None
    job = Job([ids[0]] * req.n, cfg, logprobs=top)
    rid = api.new_id("chatcmpl")
    if req.stream:
        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(req.n)]
        started = [False] * req.n

        def delta(i: int, t: str) -> dict:
            if not started[i]:  # the reply's leading whitespace belongs to the template
                t = t.lstrip()
                started[i] = bool(t)
            return {"index": i, "delta": {"content": t}, "logprobs": None}

        return _stream(server, job, req, "chat.completion.chunk", rid, len(ids[0]), first, delta)
    result = await server.run(job, request)

    def body() -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": comp.text.lstrip()},
                "logprobs": api.chat_logprobs(result.tokens[i]) if result.tokens is not None else None,
                "finish_reason": api.FINISH[comp.finish_reason],
            }
            for i, comp in enumerate(result.completions)
        ]
        used = sum(len(c.token_ids) for c in result.completions)
        return api.envelope("chat.completion", rid, server.name, choices, api.usage(len(ids[0]), used))

    return await server.respond(body)


def _check_model(server: Server, model: str | None, prompts: bool = False):
    """(embed, encode) of a trained prompt the studio serves as ``model`` (completions only), else (None, None)."""
    found = server.studio.resolve(model) if prompts and server.studio and model else None
    if found:
        return found
    if model not in (None, "", server.name):
        raise ApiError(404, f"model {model!r} is not served here; this server serves {server.name!r}", param="model", code="model_not_found")
    return None, None


def _stream(server: Server, job: Job, req, kind: str, rid: str, n_prompt: int, first: list[dict], piece) -> Response:
    """Queue ``job`` with a streaming callback; the response relays its text as server-sent events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda i, t: loop.call_soon_threadsafe(queue.put_nowait, (i, t))
    try:
        future = server.scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error", code="queue_full") from None
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))

    def chunk(choices: list, usage_: dict | None = None) -> str:
        return _event(api.envelope(kind, rid, server.name, choices, usage_))

    async def body():
        if first:
            yield chunk(first)
        while (item := await queue.get()) is not None:
            yield chunk([{**piece(*item), "finish_reason": None}])
        try:
            result = future.result()
        except (Cancelled, asyncio.CancelledError):
            return
        except Exception as e:  # noqa: BLE001 - the stream already said 200; the error goes in an event
            yield _event(ApiError(500, f"generation failed: {e}", kind="server_error").body())
            return
        done = [{**piece(i, ""), "finish_reason": api.FINISH[c.finish_reason]} for i, c in enumerate(result.completions)]
        yield chunk(done)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], api.usage(n_prompt, sum(len(c.token_ids) for c in result.completions)))
        yield "data: [DONE]\n\n"

    return _SSE(body(), on_close=lambda: server.scheduler.cancel(job))


@_route
async def models(server: Server, request: Request) -> Response:
    card = {"id": server.name, "object": "model", "created": int(time.time()), "owned_by": "clova-train", "context_length": server.context}
    return JSONResponse({"object": "list", "data": [card, *(server.studio.model_cards() if server.studio else [])]})


@_route
async def presets(server: Server, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": server.presets})


@_route
async def tokenize(server: Server, request: Request) -> Response:
    """The playground's view of a prompt: morphemes and their tokens, as `clova tokenizer show` prints them."""
    return await server.respond(partial(server.prepare_tokenize, await _body(server, request)))


@_route
async def health(server: Server, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": server.name, "queued": server.scheduler.queued, "busy": server.scheduler.busy})


@_route
async def metrics(server: Server, request: Request) -> Response:
    if not server.cfg.public_metrics:  # request counts and refusal reasons are the operator's, like the API
        server.authorize(request)
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _static(name: str):
    @_route
    async def page(server: Server, request: Request) -> Response:
        return Response(server.static[name], media_type=STATIC[name])

    return page


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found" if exc.status_code == 404 else None))


class _Observe:
    """ASGI wrapper counting every request by endpoint and status, and timing it to the last byte."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def tracked(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "/playground" if path.startswith("/playground/") else "other"
            seconds = time.perf_counter() - t0
            m = self.server.metrics
            m.inc("clova_requests_total", endpoint=endpoint, code=str(status[0]))
            m.observe("clova_request_seconds", seconds, endpoint=endpoint)
            client = scope.get("client") or ("-", 0)
            request_log.info('%s "%s %s" %d %.3fs', client[0], scope.get("method", "-"), path, status[0], seconds)


def create_app(server: Server, extra_routes=()):
    """The ASGI application serving ``server``; ``extra_routes`` come from the studio."""
    routes = [
        Route("/", _static("index.html")),
        *[Route(f"/playground/{n}", _static(n)) for n in STATIC if n != "index.html"],
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/presets", presets),
        Route("/v1/tokenize", tokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *extra_routes,
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return _Observe(app, server)

