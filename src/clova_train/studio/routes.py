"""The studio's HTTP routes on `clova serve`: input gradients, p-tuning jobs, saving presets.

They use the server's own request handling (the API key on /v1/*, OpenAI-style
errors, the body size limit, bodies parsed and checked on the preparation thread
rather than the event loop, a client that leaves cancelling its queued work) and
its generation workers for model work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Optional

from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clova_train.core.errors import ClovaError
from clova_train.evaluation.prompts import load_template
from clova_train.evaluation.tasks import FORMATS, TASKS
from clova_train.inference import api
from clova_train.inference.api import ApiError, _Strict
from clova_train.inference.presets import Preset
from clova_train.inference.scheduler import Work
from clova_train.inference.server import MAX_BODY_BYTES, Server, _body, _route
from clova_train.studio import gradients as limits
from clova_train.studio.gradients import input_gradients, parse_request


def _prepare_gradients(server: Server, raw: bytes):
    filters = server.filters.current()

    def check(text: str, param: str) -> None:
        if hit := filters.check_input(text, server.seen):
            raise server.reject(hit[0], hit[1], param)

    cfg = server.model.cfg
    body = api.load_json(raw)
    return parse_request(body, width=cfg.n_embd, base=cfg.vocab_size, context=server.context, encode=server.tok.encode_batch, check=check)


@_route
async def gradients(server: Server, request: Request) -> Response:
    # Up to MAX_VECTORS vectors of the model's width, as JSON numbers: more than a completion's body limit.
    req = await server.off_loop(_prepare_gradients, server, await _body(server, request, MAX_BODY_BYTES))
    # Requests waiting together run as one batch, up to one full request's worth of tokens.
    work = Work(input_gradients, req, args=(server.model,), size=req.tokens, capacity=limits.MAX_TOKENS)
    result = await server.run(work, request)
    return await server.respond(lambda: result)


@_route
async def ptune_info(server: Server, request: Request) -> Response:
    """What a `clova ptune --server` client needs: the model's width and context, the request limits."""
    cfg = server.model.cfg
    return JSONResponse({
        "model": server.name,
        "base_model": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size")},
        "tokenizer_hash": getattr(server.tok, "hash", None),
        "context_length": server.context,
        "limits": {"examples": limits.MAX_EXAMPLES, "vectors": limits.MAX_VECTORS, "choices": limits.MAX_CHOICES, "tokens": limits.MAX_TOKENS},
    })  # fmt: skip


# ---------------------------------------------------------------- jobs and presets (with --state-dir)


class JobBody(_Strict):
    """POST /v1/ptune/jobs: the uploaded files' text, a template (None: the task's shipped one), settings."""

    task: str
    train: str
    valid: str
    name: str = Field("", max_length=200)
    template: Optional[dict] = None
    prompt_tokens: Optional[int] = Field(None, ge=1, le=256)
    encoder: Optional[str] = None
    hidden_size: Optional[int] = Field(None, ge=2, le=4096)
    epochs: Optional[int] = Field(None, ge=1, le=100)
    lr: Optional[float] = Field(None, gt=0, le=1)
    batch_size: Optional[int] = Field(None, ge=1, le=64)
    seed: Optional[int] = Field(None, ge=0, le=2**31)
    score: Optional[str] = None


def _typed(cls, body):
    """``body`` as the dataclass ``cls``: unknown keys and wrong types are 400s naming the field, then the
    dataclass's own checks (a ClovaError) too."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this endpoint accepts {', '.join(known)}", param=unknown[0], code="unknown_field")
    try:
        return TypeAdapter(cls).validate_python(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}", param=param) from None
    except ClovaError as e:
        raise ApiError(400, str(e)) from None


def _studio(server: Server):
    if server.studio is None:
        raise ApiError(404, "p-tuning jobs and saved presets need a state directory: start `clova serve` with --state-dir DIR", code="no_state_dir")
    return server.studio


@_route
async def list_jobs(server: Server, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _studio(server).list()})


def _create_job(server: Server, raw: bytes) -> dict:
    body: JobBody = api.parse(JobBody, api.load_json(raw))
    try:
        return _studio(server).create(body.model_dump())
    except ClovaError as e:
        raise ApiError(400, str(e), code="invalid_job") from None


@_route
async def create_job(server: Server, request: Request) -> Response:
    _studio(server)  # no state directory: 404 before the upload is read
    # The uploaded train and validation files' text: more than a completion's body limit.
    return JSONResponse(await server.off_loop(_create_job, server, await _body(server, request, MAX_BODY_BYTES)))


@_route
async def get_job(server: Server, request: Request) -> Response:
    job = _studio(server).get(request.path_params["job"])
    if job is None:
        raise ApiError(404, f"no p-tuning job {request.path_params['job']!r} here; GET /v1/ptune/jobs lists them", code="not_found")
    return JSONResponse(job)


@_route
async def templates(server: Server, request: Request) -> Response:
    """Each task's shipped template, file format and labels: what the playground's job form starts from."""
    data = [
        {"task": t.name, "description": t.description, "format": FORMATS[t.name], "labels": list(t.labels), "template": asdict(load_template(t))}
        for t in TASKS.values()
    ]
    return JSONResponse({"object": "list", "data": data})


@_route
async def save_preset(server: Server, request: Request) -> Response:
    studio = _studio(server)
    raw = await _body(server, request)
    return JSONResponse(await server.off_loop(lambda: studio.save_preset(_typed(Preset, api.load_json(raw)))))


def studio_routes(server: Server) -> list[Route]:
    """The studio's routes; jobs and saving presets answer 404 unless the server has a state directory."""
    return [
        Route("/v1/ptune", ptune_info),
        Route("/v1/ptune/gradients", gradients, methods=["POST"]),
        Route("/v1/ptune/templates", templates),
        Route("/v1/ptune/jobs", list_jobs),
        Route("/v1/ptune/jobs", create_job, methods=["POST"]),
        Route("/v1/ptune/jobs/{job}", get_job),
        Route("/v1/presets", save_preset, methods=["POST"]),
    ]
