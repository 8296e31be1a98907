"""`clova serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) and the prompt playground.

Requests are checked (strict bodies, the key, the input filter, lengths)
in the event loop, then queued for :class:`~clova_train.inference.scheduler.Scheduler`'s
bounded workers, which run the project's own KV-cache generation with the
output filter's words masked at sampling. Every error is an OpenAI-style
JSON body with a 4xx code, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
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
from clova_train.inference.generate import GenerateConfig
from clova_train.inference.metrics import Metrics
from clova_train.inference.presets import load_presets
from clova_train.inference.scheduler import Cancelled, Job, QueueFull, Scheduler

PLAYGROUND = Path(__file__).parent / "playground"
STATIC = {"index.html": "text/html; charset=utf-8", "style.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "ptune.html": "text/html; charset=utf-8", "ptune.js": "text/javascript; charset=utf-8"}
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/presets", "/v1/tokenize", "/v1/completions", "/v1/chat/completions",
             "/v1/ptune", "/v1/ptune/gradients", "/v1/ptune/templates", "/v1/ptune/jobs")
CHAT_MAX_TOKENS = 256
# Request bodies above this are refused before they are read whole (a prompt of 1M characters is 4 MiB at most).
MAX_BODY_BYTES = 8 << 20
log = logging.getLogger("clova.serve")


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
        self.encode = encode or tok.encode_batch
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

    def prompt_ids(self, prompt, param: str = "prompt", encode=None) -> tuple[list[list[int]], list[str]]:
        """(ids, text) of each prompt after the input filter; token-id prompts are decoded for it."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = None
        else:
            ids = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
            if not ids or any(not p for p in ids):
                raise ApiError(400, "a prompt of token ids must not be empty", param=param)
            if any(not 0 <= i < self.vocab for p in ids for i in p):
                raise ApiError(400, f"token ids must be in 0..{self.vocab - 1}", param=param)
            texts = [self.tok.decode(p) for p in ids]
        if not texts:
            raise ApiError(400, "prompt must not be an empty list", param=param)
        filters = self.filters.current()
        for text in texts:
            hit = filters.check_input(text)
            if hit:
                raise self.reject(hit[0], hit[1], param)
        if ids is None:
            ids = [p or [self.tok.eod_id] for p in (encode or self.encode)(texts)]
        limit = filters.max_prompt_tokens
        for p in ids:
            if limit and len(p) > limit:
                raise self.reject("prompt_tokens", f"the prompt has {len(p)} tokens; this server accepts at most {limit}", param)
            if len(p) >= self.context:
                raise ApiError(
                    400, f"the prompt has {len(p)} tokens; the model's context is {self.context} tokens",
                    param=param, code="context_length_exceeded",
                )  # fmt: skip
        return ids, texts

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
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        try:
            return GenerateConfig(
                max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                stop=req.stops() + extra_stop, banned_words=list(filters.output_banned_words), batch_size=len(ids) * req.n,
            )  # fmt: skip
        except ClovaError as e:
            raise ApiError(400, str(e)) from None

    async def run(self, job: Job):
        try:
            return await asyncio.wrap_future(self.scheduler.submit(job))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error", code="queue_full") from None


# ---------------------------------------------------------------- routes


async def _body(request: Request) -> dict:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


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


@_route
async def completions(server: Server, request: Request) -> Response:
    req: CompletionRequest = api.parse(CompletionRequest, await _body(request))
    embed, encode = _check_model(server, req.model, prompts=True)
    ids, texts = server.prompt_ids(req.prompt, encode=encode)
    if len(ids) * req.n > api.MAX_CHOICES:
        raise ApiError(400, f"{len(ids)} prompts with n={req.n} make more than {api.MAX_CHOICES} completions; split the request", param="n")
    cfg = server.generate_config(req, ids, req.max_tokens, [])
    job = Job([p for p in ids for _ in range(req.n)], cfg, logprobs=req.logprobs, echo=req.echo, embed=embed)
    rid, n_prompt = api.new_id("cmpl"), sum(len(p) for p in ids)
    if req.stream:
        first = [{"text": texts[p], "index": c, "logprobs": None, "finish_reason": None} for c, p in _choices(len(ids), req.n)] if req.echo else []
        return _stream(server, job, req, "text_completion", rid, n_prompt, first, lambda i, t: {"text": t, "index": i, "logprobs": None})
    result = await server.run(job)
    choices = []
    for (c, p), comp in zip(_choices(len(ids), req.n), result.completions):
        text = (texts[p] if req.echo else "") + comp.text
        lp = api.completion_logprobs(result.tokens[c], 0) if result.tokens is not None else None
        choices.append({"text": text, "index": c, "logprobs": lp, "finish_reason": api.FINISH[comp.finish_reason]})
    used = sum(len(c.token_ids) for c in result.completions)
    return JSONResponse(api.envelope("text_completion", rid, server.name, choices, api.usage(n_prompt, used)))


@_route
async def chat_completions(server: Server, request: Request) -> Response:
    req: ChatRequest = api.parse(ChatRequest, await _body(request))
    _check_model(server, req.model)
    filters = server.filters.current()
    for i, m in enumerate(req.messages):
        hit = filters.check_input(m.text)
        if hit:
            raise server.reject(hit[0], hit[1], f"messages.{i}.content")
    text, stops = api.chat_prompt(req.messages)
    ids, _ = server.prompt_ids(text, "messages")
    room = server.context - len(ids[0])
    max_tokens = req.max_completion_tokens or req.max_tokens or min(CHAT_MAX_TOKENS, room, filters.max_tokens or room)
    cfg = server.generate_config(req, ids, max_tokens, stops)
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
    result = await server.run(job)
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
    return JSONResponse(api.envelope("chat.completion", rid, server.name, choices, api.usage(len(ids[0]), used)))


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
    body = await _body(request)
    if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str):
        raise ApiError(400, 'the body must be {"text": "..."}', param="text")
    tok, text = server.tok, body["text"]
    pieces = tok.segment(text) if hasattr(tok, "segment") else [text]
    rows = []
    for piece, ids in zip(pieces, tok.encode_batch(pieces) if pieces else []):
        rows.append({"morpheme": piece, "ids": ids, "tokens": [server.scheduler.token_text(i) for i in ids]})
    return JSONResponse({"morphemes": rows, "tokens": len(tok.encode(text)) if text else 0})


@_route
async def health(server: Server, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": server.name, "queued": server.scheduler.queued, "busy": server.scheduler.busy})


@_route
async def metrics(server: Server, request: Request) -> Response:
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
            m = self.server.metrics
            m.inc("clova_requests_total", endpoint=endpoint, code=str(status[0]))
            m.observe("clova_request_seconds", time.perf_counter() - t0, endpoint=endpoint)


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


def serve(model, tok, cfg: ServeConfig, *, embed=None, encode=None, on_ready: Callable[[str], None] | None = None, extend=None) -> None:
    """Serve until interrupted (Ctrl-C); ``on_ready(url)`` once the port is bound (port 0: a free one).

    ``extend(server)`` returns more routes and a ``close()`` for shutdown (the studio's).
    """
    import socket

    import uvicorn

    server = Server(model, tok, cfg, embed=embed, encode=encode)
    try:
        extra, close = extend(server) if extend else ((), lambda: None)
    except BaseException:
        server.scheduler.close()
        raise
    # Bound here rather than by uvicorn, so a busy port is one clear line and port 0 reports its number.
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        close()
        server.scheduler.close()
        raise ClovaError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; choose another --port or --host") from None
    port = sock.getsockname()[1]
    if on_ready:
        on_ready(f"http://{cfg.host}:{port}/")
    config = uvicorn.Config(create_app(server, extra), log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        close()
        server.scheduler.close()
        sock.close()
