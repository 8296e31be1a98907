"""The studio's HTTP routes on `clova serve`: input gradients, p-tuning jobs, saving presets.

They use the server's own request handling (the API key on /v1/*, OpenAI-style
errors, the body size limit) and its generation workers for model work.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clova_train.inference.scheduler import Work
from clova_train.inference.server import Server, _body, _route
from clova_train.studio import gradients as limits
from clova_train.studio.gradients import input_gradients, parse_request


@_route
async def gradients(server: Server, request: Request) -> Response:
    body = await _body(request)
    req = parse_request(body, width=server.model.cfg.n_embd, base=server.model.cfg.vocab_size, context=server.context, encode=server.tok.encode_batch)
    result = await server.run(Work(lambda: input_gradients(server.model, req)))
    return JSONResponse(result)


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


def studio_routes(server: Server, studio=None) -> list[Route]:
    """The routes; ``studio`` (a :class:`~clova_train.studio.jobs.Studio`) adds jobs and presets."""
    routes = [Route("/v1/ptune", ptune_info), Route("/v1/ptune/gradients", gradients, methods=["POST"])]
    if studio is not None:
        routes += studio.routes()
    return routes
