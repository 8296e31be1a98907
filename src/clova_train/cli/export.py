"""`clova export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clova_train.cli.common import err, existing_dir, friendly, out


@friendly
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory written by `clova train`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Hugging Face model directory to write (must not exist)."),
    step: str = typer.Option("latest", "--step", help="Checkpoint step to export, or 'latest'."),
    dtype: str = typer.Option("bf16", "--dtype", help="Weights dtype: bf16, fp16 or fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file (5GB, 500MB, 2GiB); larger exports get an index."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="The training tokenizer dir, if it moved since training (its hash must match)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the export with transformers and compare logits and token ids (skip for very large models)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace HF_DIR if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Export a checkpoint as a Hugging Face GPT-2 model + morpheme-aware tokenizer (AutoModelForCausalLM, AutoTokenizer).

    Example: [bold]clova export runs/350m --out hf/350m --dtype bf16[/]
    """
    existing_dir(run_dir, "run directory; pass the directory `clova train` wrote")
    from clova_train.export.hf import ExportConfig, export_hf

    cfg = ExportConfig(dtype=dtype, max_shard_size=max_shard_size, verify=verify, overwrite=overwrite)
    r = export_hf(run_dir, out_dir, cfg, step=step, tokenizer=tokenizer, show_progress=not quiet)
    table = Table(title=f"exported to {r['out']}", show_header=False)
    table.add_row("checkpoint", f"{r['tag']} (step {r['step']:,})")
    table.add_row("tokens seen", f"{r['tokens']:,}" if isinstance(r["tokens"], int) else str(r["tokens"]))
    table.add_row("parameters", f"{r['parameters']:,}")
    table.add_row("weights", f"{r['dtype']}, {r['bytes'] / 1e6:,.1f} MB in {len(r['files'])} file(s)")
    if r["verified"]:
        v = r["verified"]
        table.add_row("verified", f"logits max abs diff {v['max_abs_diff']:.2e} <= {v['tolerance']:.1e}; token ids match on {v['probe_tokens']} probe tokens")
    table.add_row("seconds", f"{r['seconds']['total']:.1f} (weights {r['seconds']['weights']:.1f})")
    out.print(table)
    if not r["verified"]:
        err.print("[yellow]not verified (--no-verify)[/]: logits and token ids were not checked against transformers")
