"""What every command shares: the consoles, the one-line error wrapper, small formatting helpers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from clova_train.core.errors import ClovaError

out = Console()
err = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn a ClovaError into one red line and exit code 2 (or the error's own ``exit_code``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClovaError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 2))

    return wrapper


def _skip_rows(table: Table, skipped: dict) -> None:
    table.add_row("documents skipped", f"{skipped['total']:,}")
    for reason, n in skipped["by_reason"].items():
        where = ", ".join(skipped["examples"].get(reason, [])[:2])
        table.add_row(f"  {reason}", f"{n:,}  (e.g. {where})")


# MODEL is an exported HF dir or a run dir (read by export.load_for_inference),
# or a dir holding model.pt + config.json + tokenizer/.
_MODEL_HELP = "An exported Hugging Face dir, a run dir, or a dir with model.pt + config.json + tokenizer/."
_DEVICE_HELP = "cpu, cuda, cuda:1, ... (auto: cuda when available)."
_DTYPE_HELP = "float32, bfloat16 or float16."
_SAVED_DTYPE_HELP = "auto (the dtype the export was saved in; float32 for a run dir), float32, bfloat16 or float16."


def existing_dir(path: Path, what: str) -> Path:
    """Answer a mistyped directory at once, before the command loads torch (a second or more)."""
    if not path.is_dir():
        raise ClovaError(f"{path}: no such {what}")
    return path


def _str(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _unescape(text: str) -> str:
    """Let `--stop '\\n'` mean a newline, as it does in HyperCLOVA Studio."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
