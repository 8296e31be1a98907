"""Running `clova serve`: the listening socket, uvicorn, and what shutdown closes.

Apart from :mod:`~clova_train.inference.server` (what a request does) because this is about the process:
the port is bound before the model loads, the studio adds its routes, and everything started is stopped.
"""

from __future__ import annotations

import gc
from typing import Callable

from clova_train.core.errors import ClovaError
from clova_train.inference.server import ServeConfig, Server, create_app


def listen(cfg: ServeConfig):
    """The server's bound socket. Bound by us rather than by uvicorn, and before the model loads, so a
    busy port is one clear line at once and port 0 reports its number."""
    import socket

    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise ClovaError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; choose another --port or --host") from None
    return sock


def serve(
    model, tok, cfg: ServeConfig, *, sock=None, embed=None, encode=None, on_ready: Callable[[str], None] | None = None, extend=None,
) -> None:
    """Serve until interrupted (Ctrl-C) on ``sock`` (default: :func:`listen`); ``on_ready(url)`` once bound.

    ``extend(server)`` returns more routes and a ``close()`` for shutdown (the studio's).
    """
    import uvicorn

    sock = sock or listen(cfg)
    server = Server(model, tok, cfg, embed=embed, encode=encode)
    close: Callable[[], None] = lambda: None
    try:
        extra, close = extend(server) if extend else ((), close)
        port = sock.getsockname()[1]
        if on_ready:
            on_ready(f"http://{cfg.host}:{port}/")
        # What is loaded by now (model, tokenizer, libraries) lives as long as the server: frozen, a full garbage
        # collection does not walk it, which otherwise held every thread, /health's too, for 100+ ms at a time.
        gc.collect()
        gc.freeze()
        config = uvicorn.Config(create_app(server, extra), log_level="warning", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        close()
        server.scheduler.close()
        server.prep.shutdown(wait=False, cancel_futures=True)
        sock.close()
