"""`clova tokenizer train|show|stats`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from clova_train.cli.common import _skip_rows, err, friendly, out


app = typer.Typer(help="Learn and inspect the morpheme-aware byte-level BPE.", no_args_is_help=True)


@app.command("train")
@friendly
def tokenizer_train(
    inputs: List[Path] = typer.Argument(..., help="Corpus files: .txt, .jsonl[.gz|.zst], .parquet, or saved `datasets` dirs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output tokenizer directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="A recipe from tokenizer/*.json; flags override it."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included.", rich_help_panel="BPE"),
    min_frequency: Optional[int] = typer.Option(None, "--min-frequency", help="Minimum count of a merge.", rich_help_panel="BPE"),
    special_tokens: Optional[str] = typer.Option(None, "--special-tokens", help="Comma-separated; the first is end-of-document.", rich_help_panel="BPE"),
    normalization: Optional[str] = typer.Option(None, "--normalization", help="NFC (default), NFKC or none.", rich_help_panel="Text"),
    sample_fraction: Optional[float] = typer.Option(None, "--sample-fraction", help="Learn on this stable fraction of documents (paper: 0.01).", rich_help_panel="Input"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the document sample.", rich_help_panel="Input"),
    text_key: Optional[str] = typer.Option(None, "--text-key", help="Text field in jsonl/parquet/datasets inputs.", rich_help_panel="Input"),
    doc_sep: Optional[str] = typer.Option(None, "--doc-sep", help=".txt documents: 'line' or 'blank' (blank-line separated).", rich_help_panel="Input"),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="'raise' (default) or 'skip' bad documents, counted by reason.", rich_help_panel="Input"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes reading the inputs and threads for BPE training (0: all cores); the tokenizer is the same for any count."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Learn a morpheme-aware byte-level BPE: MeCab-ko splits morphemes, merges never cross one.

    Example: [bold]clova tokenizer train corpus/*.jsonl.zst --vocab-size 51200 --sample-fraction 0.01 --out tok/[/]
    """
    from clova_train.core.config import load_json, override
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    cfg = load_json(TokenizerConfig, config) if config else TokenizerConfig()
    specials = [s for s in special_tokens.split(",") if s] if special_tokens is not None else None
    cfg = override(
        cfg,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        normalization=normalization,
        sample_fraction=sample_fraction,
        seed=seed,
        text_key=text_key,
        doc_sep=doc_sep,
        on_error=on_error,
        workers=workers,
    )
    report = train_tokenizer(inputs, out_dir, cfg, show_progress=not quiet)
    table = Table(title=f"tokenizer written to {report['out']}", show_header=False)
    table.add_row("vocabulary", f"{report['vocab_size']:,}")
    table.add_row("documents read / used", f"{report['documents_read']:,} / {report['documents_used']:,}")
    table.add_row("characters", f"{report['characters']:,}")
    table.add_row("unique eojeols / morphemes", f"{report['unique_eojeols']:,} / {report['unique_morphemes']:,}")
    table.add_row("seconds (read, segment, bpe)", ", ".join(f"{report['seconds'][k]:.2f}" for k in ("read", "segment", "bpe")))
    _skip_rows(table, report["skipped"])
    out.print(table)
    for warning in report["warnings"]:
        err.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


@app.command("show")
@friendly
def tokenizer_show(
    tokenizer_dir: Path = typer.Argument(..., help="Tokenizer directory."),
    text: str = typer.Argument(..., help="Text to segment and encode."),
) -> None:
    """Show the morphemes, tokens and ids of a text.

    Example: [bold]clova tokenizer show tok/ "대한민국 헌법은 국민의 자유를 보장한다."[/]
    """
    from clova_train.tokenizer.bpe import ClovaTokenizer, token_repr

    tok = ClovaTokenizer.load(tokenizer_dir)
    pieces = tok.segment(text)
    table = Table(title=f"{len(pieces)} morphemes, {len(tok.encode(text))} tokens")
    table.add_column("morpheme")
    table.add_column("tokens")
    table.add_column("ids", justify="right")
    for piece in pieces:
        ids = tok.encode(piece)
        shown = " | ".join(token_repr(tok.token_bytes(i)) for i in ids)
        table.add_row(repr(piece)[1:-1], shown, " ".join(map(str, ids)))
    out.print(table)


# The report's keys as a reader says them (the JSON keeps the keys).
_STAT_LABELS = {"encode_mb_per_s": "encode speed (MB/s)", "crossing_tokens": "tokens crossing a morpheme (must be 0)"}


@app.command("stats")
@friendly
def tokenizer_stats(
    tokenizer_dir: Path = typer.Argument(..., help="Tokenizer directory."),
    inputs: List[Path] = typer.Argument(..., help="Text to measure on (same formats as training)."),
    text_key: str = typer.Option("text", "--text-key", help="Text field in jsonl/parquet/datasets inputs."),
    limit: int = typer.Option(0, "--limit", help="Measure at most this many documents (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Throughput, tokens per character and per word, and tokens crossing a morpheme (must be 0).

    Example: [bold]clova tokenizer stats tok/ heldout.jsonl[/]
    """
    from clova_train.tokenizer.bpe import ClovaTokenizer
    from clova_train.tokenizer.training import tokenizer_stats as stats

    from clova_train.core.progress import progress_bar

    with progress_bar("checking documents", None, enabled=not as_json) as advance:
        report = stats(ClovaTokenizer.load(tokenizer_dir), inputs, text_key=text_key, limit=limit, advance=advance)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tokenizer {tokenizer_dir}", show_header=False)
    for k, v in report.items():
        table.add_row(_STAT_LABELS.get(k, k.replace("_", " ")), f"{v:,.4f}" if isinstance(v, float) else f"{v:,}")
    out.print(table)
    if report["crossing_tokens"]:
        err.print("[bold red]tokens cross morpheme boundaries: the tokenizer is broken[/]")
        raise typer.Exit(1)
