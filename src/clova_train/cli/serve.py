"""`clova serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clova_train.cli.common import _DEVICE_HELP, _MODEL_HELP, _SAVED_DTYPE_HELP, _str, existing_dir, friendly, out
from clova_train.core.errors import ClovaError


@friendly
def serve_cmd(
    model_dir: Path = typer.Argument(..., metavar="HF_DIR", help=_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CLOVA_API_KEY", show_envvar=True, help="Clients must send 'Authorization: Bearer KEY'."),
    ptune: Optional[Path] = typer.Option(None, "--ptune", help="A `clova ptune` dir: its trained vectors go where its template says; prompts fill the task's input."),
    filters: Optional[Path] = typer.Option(None, "--filters", help="Input/output filter JSON (banned words, patterns, length limits); reloaded when it changes."),
    presets: Optional[Path] = typer.Option(None, "--presets", help="A folder of your own playground presets (*.json)."),
    workers: int = typer.Option(1, "--workers", help="Generation threads (each runs one batch at a time)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests waiting beyond this get 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model's name in the API (default: the directory's name)."),
    public_metrics: bool = typer.Option(False, "--public-metrics", help="Serve /metrics without the API key (default: it needs the key, like /v1)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Keep p-tuning jobs, their trained prompts and saved presets here (they survive a restart)."),
    ptune_jobs: int = typer.Option(1, "--ptune-jobs", help="P-tuning jobs trained at once (with --state-dir); more wait in a queue."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=_SAVED_DTYPE_HELP),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions) with a prompt playground at /.

    Example: [bold]clova serve hf/ --port 8000 --filters filters.json[/], then open http://127.0.0.1:8000/
    """
    import sys

    existing_dir(model_dir, "model directory")
    import logging

    from clova_train.inference.generate import load_model
    from clova_train.inference.server import ServeConfig
    from clova_train.inference.serving import listen, serve

    cfg = ServeConfig(
        host=host, port=port, api_key=api_key or "", filters=_str(filters) or "", workers=workers, max_queue=max_queue,
        presets=_str(presets) or "", model_name=model_name or model_dir.resolve().name, public_metrics=public_metrics,
    )  # fmt: skip
    if ptune_jobs != 1 and state_dir is None:
        raise ClovaError("--ptune-jobs sets how many p-tuning jobs train at once; jobs need --state-dir DIR")
    sock = listen(cfg)  # a busy port answers now, not after the model loads
    model, tok = load_model(model_dir, device=device, dtype=dtype)
    embed = encode = None
    if ptune is not None:
        embed, encode = _ptuned(model, tok, ptune)

    def ready(url: str) -> None:
        out.print(f"serving {cfg.model_name} on {url} (playground at /, API at /v1)", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    requests = logging.getLogger("clova.serve.requests")
    if not requests.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        requests.addHandler(handler)
        requests.setLevel(logging.INFO)

    def extend(server):
        from clova_train.studio.routes import studio_routes

        if state_dir is not None:
            from clova_train.studio.jobs import Studio

            server.studio = Studio(state_dir, server.model, server.tok, server.name, server.presets, workers=ptune_jobs)
        return studio_routes(server), server.studio.close if server.studio else lambda: None

    serve(model, tok, cfg, sock=sock, embed=embed, encode=encode, on_ready=ready, extend=extend)


def _ptuned(model, tok, path: Path):
    """(embed, encode) of a trained prompt; the CLI asks the studio because evaluation (which owns
    p-tuning) sits above inference."""
    from clova_train.studio.codec import prompt_codec

    return prompt_codec(model, tok, path)
