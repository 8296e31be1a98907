"""`clova demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from clova_train.cli.common import err, friendly, out


@friendly
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo-run"), "--out", "-o", help="Directory for every stage's output."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of reusing finished stages."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default 150)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Training processes (default 2, ZeRO-3 across them)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Korean prompt for the final generation."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run the whole pipeline on the Korean text shipped with konlpy: tokenizer, shards, ZeRO-3 training, export, generation.

    Example: [bold]clova demo --out demo-run[/]
    """
    from clova_train.core.config import override
    from clova_train.demo import DemoConfig, run_demo

    cfg = override(DemoConfig(out=str(out_dir), fresh=fresh), steps=steps, nproc=nproc, prompt=prompt)
    s = run_demo(cfg, show_progress=not quiet, log=lambda m: err.print(f"[bold cyan]demo[/] {escape(m)}", highlight=False))
    table = Table(title="clova demo: done", show_header=False)
    stage_of = {"clean": "dedup", "tokenizer": "tokenizer", "shards": "shards", "run": "train", "hf": "export"}
    for key, path in s["dirs"].items():
        table.add_row(stage_of[key], f"{path}  ({s['seconds'].get(stage_of[key], 0):.1f} s)")
    d = s["dedup"]
    table.add_row("dedup", f"{d['documents_read']:,} read, {d['documents_kept']:,} kept; removed "
                  + ", ".join(f"{n:,} {reason}" for reason, n in d["removed"].items()))
    t = s["tokens"]
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in s["skipped"].items())
    table.add_row("documents", f"{t.get('documents_read', 0):,} read, {t.get('documents_written', 0):,} written, "
                  f"{sum(s['skipped'].values()):,} skipped" + (f" ({reasons})" if reasons else ""))
    table.add_row("tokens", f"{t.get('tokens', 0):,} in {t.get('shards', 0)} shards")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    table.add_row("train loss", f"{fmt(s['first_loss'])} -> {fmt(s['final_loss'])}")
    table.add_row("valid loss", fmt(s["final_valid_loss"]))
    table.add_row("loss plot", s["loss_plot"])
    table.add_row("generated", s["generated"])
    out.print(table)
    d = s["dirs"]
    out.print(
        "[bold]Next, on your own corpus:[/]\n"
        "  clova dedup corpus/*.jsonl --out clean/\n"
        "  clova tokenizer train clean/ --config tokenizer/hyperclova.json --out tok/\n"
        "  clova tokenize clean/ --tokenizer tok/ --out shards/ --valid-fraction 0.005\n"
        "  clova plan --model 1.3b --gpus 8 --gpu-mem 80\n"
        "  clova train --model 1.3b --data shards/ --out runs/1.3b --nproc-per-node 8\n"
        f"  clova generate {d['hf']} \"{s['prompt']}\" --stream",
        highlight=False,
        soft_wrap=True,
    )
