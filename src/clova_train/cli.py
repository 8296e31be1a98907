"""The `clova` command: a thin Typer layer over the library.

Each command parses its flags, builds a config, calls one library function
and prints the result. A :class:`ClovaError` becomes one red line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ClovaError

app = typer.Typer(
    name="clova",
    help="Pre-train a Korean GPT-3-class model the HyperCLOVA way, and hand it to Hugging Face.\n\n"
    "Pipeline: tokenizer train -> tokenize -> train -> export -> generate / eval / ptune.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
tokenizer_app = typer.Typer(help="Learn and inspect the morpheme-aware byte-level BPE.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

out = Console()
err = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn a ClovaError into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClovaError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


# ---------------------------------------------------------------- tokenizer


@tokenizer_app.command("train")
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
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads for BPE training (0: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Learn a morpheme-aware byte-level BPE: MeCab-ko splits morphemes, merges never cross one.

    Example: [bold]clova tokenizer train corpus/*.jsonl.zst --vocab-size 51200 --sample-fraction 0.01 --out tok/[/]
    """
    from .config import load_json, override
    from .tokenizer import TokenizerConfig, train_tokenizer

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


def _skip_rows(table: Table, skipped: dict) -> None:
    table.add_row("documents skipped", f"{skipped['total']:,}")
    for reason, n in skipped["by_reason"].items():
        where = ", ".join(skipped["examples"].get(reason, [])[:2])
        table.add_row(f"  {reason}", f"{n:,}  (e.g. {where})")


@tokenizer_app.command("show")
@friendly
def tokenizer_show(
    tokenizer_dir: Path = typer.Argument(..., help="Tokenizer directory."),
    text: str = typer.Argument(..., help="Text to segment and encode."),
) -> None:
    """Show the morphemes, tokens and ids of a text.

    Example: [bold]clova tokenizer show tok/ "대한민국 헌법은 국민의 자유를 보장한다."[/]
    """
    from .tokenizer import ClovaTokenizer

    tok = ClovaTokenizer.load(tokenizer_dir)
    table = Table(title=f"{len(tok.segment(text))} morphemes, {len(tok.encode(text))} tokens")
    table.add_column("morpheme")
    table.add_column("tokens")
    table.add_column("ids", justify="right")
    for piece in tok.segment(text):
        ids = tok.encode(piece) if not piece.isspace() else tok.encode(piece)
        shown = " | ".join(repr(tok.token_bytes(i).decode("utf-8", "replace"))[1:-1] for i in ids)
        table.add_row(repr(piece)[1:-1], shown, " ".join(map(str, ids)))
    out.print(table)


@tokenizer_app.command("stats")
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
    from .tokenizer import ClovaTokenizer, tokenizer_stats as stats

    report = stats(ClovaTokenizer.load(tokenizer_dir), inputs, text_key=text_key, limit=limit)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tokenizer {tokenizer_dir}", show_header=False)
    for k, v in report.items():
        table.add_row(k.replace("_", " "), f"{v:,.4f}" if isinstance(v, float) else f"{v:,}")
    out.print(table)
    if report["crossing_tokens"]:
        err.print("[bold red]tokens cross morpheme boundaries: the tokenizer is broken[/]")
        raise typer.Exit(1)


# ---------------------------------------------------------------- plan


@app.command("plan")
@friendly
def plan_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Preset: tiny, small, 137m, 350m, 760m, 1.3b, 6.9b, 13b, 39b, 82b."),
    gpus: int = typer.Option(8, "--gpus", help="GPUs per node."),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="Memory of one GPU, GB."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes."),
    cpu_mem: float = typer.Option(1024.0, "--cpu-mem", help="Host memory per node, GB (for offload)."),
    parallel: str = typer.Option("zero3", "--parallel", help="zero3 or pipeline (ZeRO-1 across replicas)."),
    pipeline_stages: int = typer.Option(1, "--pipeline-stages", help="Stages in pipeline mode."),
    offload: str = typer.Option("none", "--offload", help="ZeRO-3 offload: none, cpu or nvme."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per sequence."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per GPU per step."),
    vocab_size: int = typer.Option(51200, "--vocab-size", help="Padded vocabulary size."),
    precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Recompute blocks in backward."),
    tokens: float = typer.Option(150e9, "--tokens", help="Tokens to train on."),
    mfu: float = typer.Option(0.4, "--mfu", help="Assumed model FLOPs utilisation."),
    gpu_type: str = typer.Option("a100", "--gpu-type", help="Peak TFLOP/s from: a100, h100, h200, a10g, l40s, v100."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s of one GPU (overrides --gpu-type)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Memory per GPU, whether a run fits, what would make it fit, and how long it takes.

    Example: [bold]clova plan --model 82b --gpus 8 --gpu-mem 80 --nodes 128 --parallel pipeline --pipeline-stages 8[/]
    """
    from .plan import ACCELERATOR_PEAK_TFLOPS, PlanConfig, estimate, suggest

    if peak_tflops is None:
        if gpu_type.lower() not in ACCELERATOR_PEAK_TFLOPS:
            raise ClovaError(f"unknown --gpu-type {gpu_type!r}; use one of {', '.join(ACCELERATOR_PEAK_TFLOPS)} or --peak-tflops")
        peak_tflops = ACCELERATOR_PEAK_TFLOPS[gpu_type.lower()]
    cfg = PlanConfig(
        model=model, gpus=gpus, gpu_mem=gpu_mem, nodes=nodes, cpu_mem=cpu_mem, parallel=parallel, pipeline_stages=pipeline_stages,
        offload=offload, seq_len=seq_len, micro_batch=micro_batch, vocab_size=vocab_size, precision=precision,
        activation_checkpointing=activation_checkpointing, tokens=tokens, mfu=mfu, peak_tflops=peak_tflops,
    )
    est = estimate(cfg)
    fixes = [] if est["fits"] else suggest(cfg)
    if as_json:
        out.print_json(json.dumps({**est, "suggestions": fixes}))
        return
    print_plan(est, fixes)


def print_plan(est: dict, fixes: list[str]) -> None:
    """The plan table; `clova train` prints the same one before it starts."""
    from .plan import GB, format_duration

    c, b = est["config"], est["bytes"]
    mode = c["parallel"] + (f", {c['pipeline_stages']} stages" if c["parallel"] == "pipeline" else "")
    mode += f", offload {c['offload']}" if c["offload"] != "none" else ""
    table = Table(title=f"plan: {c['model']} on {c['nodes']} x {c['gpus']} GPUs of {c['gpu_mem']:g} GB ({mode}, {c['precision']})", show_header=False)
    table.add_row("parameters", f"{est['parameters']:,}")
    table.add_row("data-parallel ranks", f"{est['data_parallel']}")
    for k in ("parameters", "gradients", "optimizer"):
        table.add_row(f"{k} per GPU", f"{b[k] / GB:,.2f} GB")
    table.add_row("activations per GPU", f"{b['activations'] / GB:,.2f} GB (checkpointing: {b['activations_with_checkpointing'] / GB:,.2f} GB, none: {b['activations_without_checkpointing'] / GB:,.2f} GB)")
    table.add_row("total per GPU", f"{b['total'] / GB:,.2f} GB of {b['usable'] / GB:,.2f} GB usable")
    if b["cpu_per_node"]:
        table.add_row("host memory per node", f"{b['cpu_per_node'] / GB:,.1f} GB of {c['cpu_mem']:g} GB" + ("" if est["host_fits"] else " [red](too much)[/]"))
    table.add_row("fits", "[green]yes[/]" if est["fits"] else "[red]no[/]")
    for f in fixes:
        table.add_row("would fit with", f)
    if not est["fits"] and not fixes:
        table.add_row("would fit with", "more GPUs (no stage count or offload on this cluster is enough)")
    table.add_row(f"time for {c['tokens']:.3g} tokens", f"{format_duration(est['train_seconds'])} at {c['mfu']:.0%} MFU of {c['peak_tflops']:g} TFLOP/s")
    out.print(table)
