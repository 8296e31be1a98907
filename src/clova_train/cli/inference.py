"""`clova generate`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clova_train.cli.common import _DEVICE_HELP, _MODEL_HELP, _SAVED_DTYPE_HELP, _unescape, existing_dir, friendly, out
from clova_train.core.errors import ClovaError


@friendly
def generate_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    prompt: Optional[str] = typer.Argument(None, help="The prompt; leave out with --input."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Most tokens to generate.", rich_help_panel="Decoding"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 is greedy.", rich_help_panel="Decoding"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (0: all).", rich_help_panel="Decoding"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (1: off).", rich_help_panel="Decoding"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed.", rich_help_panel="Decoding"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop before this text; repeatable; '\\n' is a newline.", rich_help_panel="Filters"),
    banned_words: Optional[Path] = typer.Option(None, "--banned-words", help="File of words never to generate, one per line.", rich_help_panel="Filters"),
    stream: bool = typer.Option(False, "--stream", help="Print the text as it is generated."),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="Batch mode: jsonl with a \"prompt\" field per line.", rich_help_panel="Batch"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", help="Batch mode: jsonl written with \"completion\" added.", rich_help_panel="Batch"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts decoded together.", rich_help_panel="Batch"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every step without the key/value cache (slow; for checks)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=_SAVED_DTYPE_HELP),
) -> None:
    """Complete a prompt (greedy or sampled, with a key/value cache), or every prompt of a jsonl file.

    Example: [bold]clova generate hf/ "대한민국의 수도는" --temperature 0.7 --top-p 0.9 --stop '\\n' --stream[/]
    """
    import sys

    existing_dir(model_dir, "model directory")
    from clova_train.core.config import override
    from clova_train.core.textfiles import read_lines
    from clova_train.inference.generate import GenerateConfig, generate, generate_file, load_model

    if (prompt is None) == (input_file is None):
        raise ClovaError("give either a PROMPT or --input FILE.jsonl")
    if input_file is not None and output_file is None:
        raise ClovaError("--input needs --output FILE.jsonl for the completions")
    cfg = override(
        GenerateConfig(),
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
        stop=[_unescape(s) for s in stop] if stop else None,
        banned_words=read_lines(banned_words) if banned_words else None,
        use_cache=False if no_cache else None,
    )
    model, tok = load_model(model_dir, device=device, dtype=dtype)
    if input_file is not None:
        from clova_train.core.progress import progress_bar

        with progress_bar("generating", None, enabled=True) as advance:
            n = generate_file(model, tok, input_file, output_file, cfg, advance=advance)
        out.print(f"{n} completions written to {output_file}")
        return
    if stream:
        def write(_: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        generate(model, tok, [prompt], cfg, on_text=write)
        sys.stdout.write("\n")
        return
    out.print(generate(model, tok, [prompt], cfg)[0].text, markup=False, highlight=False)
