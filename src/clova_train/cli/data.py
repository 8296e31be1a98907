"""`clova tokenize` (and `tokenize merge`) and `clova shards inspect|verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from clova_train.cli.common import _skip_rows, friendly, out
from typer.core import TyperCommand


# `clova tokenize INPUT...` and `clova tokenize merge DIR...` share one name:
# a command, not a group, because a group would swallow INPUT... as a
# subcommand name. The command hands over to the merge command when its first
# argument is "merge" (an input file literally named so: pass ./merge).

merge_app = typer.Typer(add_completion=False)


class TokenizeCommand(TyperCommand):
    """`clova tokenize INPUT...`, or `clova tokenize merge DIR...` dispatched to :func:`tokenize_merge`."""

    _MERGE = "clova.tokenize.merge_args"

    def parse_args(self, ctx, args):
        if args[:1] == ["merge"]:
            ctx.meta[self._MERGE] = args[1:]
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        if self._MERGE not in ctx.meta:
            return super().invoke(ctx)
        cmd = typer.main.get_command(merge_app)
        # The parent is the app, not this command, so usage reads "clova tokenize merge".
        with cmd.make_context(f"{ctx.info_name} merge", ctx.meta.pop(self._MERGE), parent=ctx.parent) as sub:
            return cmd.invoke(sub)


@friendly
def tokenize(
    inputs: List[Path] = typer.Argument(..., help="Corpus: .txt, .jsonl[.gz|.zst], .parquet, or saved `datasets` dirs."),
    tokenizer_dir: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer dir from `clova tokenizer train`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Shard dir; rerunning into it resumes an interrupted run."),
    config: Optional[Path] = typer.Option(None, "--config", help="A JSON ShardConfig; flags override it."),
    shard_tokens: Optional[int] = typer.Option(None, "--shard-tokens", help="Tokens per shard (default 1B: 2 GB at uint16; the paper's 561B tokens make ~560 shards).", rich_help_panel="Shards"),
    valid_fraction: Optional[float] = typer.Option(None, "--valid-fraction", help="Held-out fraction, by a stable hash of the text (default 0.01).", rich_help_panel="Shards"),
    min_chars: Optional[int] = typer.Option(None, "--min-chars", help="Skip shorter documents (after cleaning).", rich_help_panel="Cleaning"),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="A longer document is bad input (default 4M).", rich_help_panel="Cleaning"),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="Drop exact duplicates across all inputs (default on).", rich_help_panel="Cleaning"),
    text_key: Optional[str] = typer.Option(None, "--text-key", help="Text field in jsonl/parquet/datasets inputs.", rich_help_panel="Input"),
    doc_sep: Optional[str] = typer.Option(None, "--doc-sep", help=".txt documents: 'line' or 'blank' (blank-line separated).", rich_help_panel="Input"),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="'raise' (default) or 'skip' bad documents, counted by reason.", rich_help_panel="Input"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Tokenizing processes (0: all cores); the output is the same for any count."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Machines sharing the inputs (default: SLURM_ARRAY_TASK_COUNT or 1).", rich_help_panel="Many machines"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This machine's slice (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN or 0).", rich_help_panel="Many machines"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Clean, deduplicate and tokenize a corpus into Megatron-format shards (.bin/.idx + manifest.json).

    Example: [bold]clova tokenize corpus/*.jsonl.zst --tokenizer tok/ --out shards/[/]

    Many machines: each runs the same command with [bold]--num-nodes K --node-rank R[/] (or as a Slurm array, see cli/slurm_tokenize.sbatch), then [bold]clova tokenize merge shards-*/ --out shards/[/] joins the node dirs without copying tokens.
    """
    from clova_train.core.config import load_json, override
    from clova_train.shards.format import ShardConfig
    from clova_train.shards.build import slurm_node_slice, tokenize_corpus

    cfg = load_json(ShardConfig, config) if config else ShardConfig()
    slurm = slurm_node_slice() if num_nodes is None or node_rank is None else None
    cfg = override(
        cfg,
        shard_tokens=shard_tokens,
        valid_fraction=valid_fraction,
        min_chars=min_chars,
        max_chars=max_chars,
        dedup=dedup,
        text_key=text_key,
        doc_sep=doc_sep,
        on_error=on_error,
        workers=workers,
        num_nodes=num_nodes if num_nodes is not None else (slurm[0] if slurm else None),
        node_rank=node_rank if node_rank is not None else (slurm[1] if slurm else None),
    )
    report = tokenize_corpus(inputs, tokenizer_dir, out_dir, cfg, show_progress=not quiet)
    if report["already_complete"]:
        title = f"{out_dir} was already complete (verified); nothing to do"
    elif report["resumed_shards"]:
        title = f"shards written to {out_dir} (resumed: kept {report['resumed_shards']} finished shards)"
    else:
        title = f"shards written to {out_dir}"
    table = _shard_summary(report, title)
    if not report["already_complete"]:
        table.add_row("speed", f"{report['mb_per_s']:,.2f} MB/s, {report['docs_per_s']:,.0f} documents/s with {report['workers']} workers")
    out.print(table)


@merge_app.command()
@friendly
def tokenize_merge(
    dirs: List[Path] = typer.Argument(..., help="The per-node shard dirs of one `clova tokenize --num-nodes K` run."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Merged dir: a manifest pointing at the node dirs by relative path."),
) -> None:
    """Join per-node shard dirs into one dataset without copying tokens.

    Shards are referenced by relative path (keep the dirs side by side); documents duplicated across nodes are dropped through a new .idx beside a symlink to the node's .bin. The result equals a single-node run in content.

    Example: [bold]clova tokenize merge shards-node*/ --out shards/[/]
    """
    from clova_train.shards.merge import merge_shard_dirs

    report = merge_shard_dirs(dirs, out_dir)
    out.print(_shard_summary(report, f"merged {len(dirs)} node dirs into {out_dir}"))


def _shard_summary(report: dict, title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_row("input files / bytes", f"{report['input_files']:,} / {report['input_bytes']:,}")
    table.add_row("documents read", f"{report['documents_read']:,}")
    for split in ("train", "valid"):
        s = report["split"][split]
        table.add_row(f"{split}", f"{s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']:,} shards")
    _skip_rows(table, report["skipped"])
    return table


shards_app = typer.Typer(help="Inspect, verify and index shard dirs made by `clova tokenize`.", no_args_is_help=True)


@shards_app.command("inspect")
@friendly
def shards_inspect(
    shard_dir: Path = typer.Argument(..., help="A shard dir (single node or merged)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a shard dir's manifest: tokenizer, inputs, shards, split and skipped documents.

    Example: [bold]clova shards inspect shards/[/]
    """
    from clova_train.shards.format import read_manifest

    man = read_manifest(shard_dir)
    if as_json:
        out.print_json(json.dumps(man))
        return
    tok, t = man["tokenizer"], man["totals"]
    head = Table(title=f"shard dir {shard_dir}", show_header=False)
    head.add_row("made by", man["created_by"])
    head.add_row("tokenizer", f"{tok['path']} (vocab {tok['vocab_size']:,}, eod {tok['eod_id']}, sha256 {tok['hash'][:16]}…)")
    head.add_row("token dtype", f"{man['dtype']} (Megatron code {man['dtype_code']})")
    node = man["node"]
    if "merged_from" in node:
        head.add_row("nodes", f"merged from {len(node['merged_from'])} dirs ({node['cross_node_duplicates']:,} cross-node duplicates dropped)")
    elif node["num_nodes"] > 1:
        head.add_row("nodes", f"rank {node['node_rank']} of {node['num_nodes']}: {t['input_files']} of {node['input_files_total']} input files")
    head.add_row("dedup", "on" if man["dedup"]["enabled"] else "off")
    head.add_row("valid fraction", f"{man['split']['valid_fraction']:g}")
    head.add_row("totals", f"{t['documents_read']:,} read = {t['documents_written']:,} written + {t['documents_skipped']:,} skipped; {t['tokens']:,} tokens in {t['shards']} shards")
    for split in ("train", "valid"):
        s = man["split"][split]
        head.add_row(split, f"{s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']} shards")
    _skip_rows(head, man["skipped"])
    out.print(head)

    inputs = Table(title="inputs")
    for col in ("path", "bytes", "read", "train", "valid", "skipped", "sha256"):
        inputs.add_column(col, justify="left" if col in ("path", "sha256") else "right", overflow="fold")
    for r in man["inputs"]:
        w = r["documents_written"]
        inputs.add_row(r["path"], f"{r['bytes']:,}", f"{r['documents_read']:,}", f"{w['train']:,}", f"{w['valid']:,}", f"{r['documents_skipped']:,}", r["sha256"][:12])
    out.print(inputs)

    shards = Table(title="shards")
    for col in ("prefix", "split", "documents", "tokens", "bin sha256", "idx sha256"):
        shards.add_column(col, justify="right" if col in ("documents", "tokens") else "left")
    for s in man["shards"]:
        shards.add_row(s["prefix"] + (" (view)" if s.get("view") else ""), s["split"], f"{s['documents']:,}", f"{s['tokens']:,}", s["bin_sha256"][:12], s["idx_sha256"][:12])
    out.print(shards)


@shards_app.command("verify")
@friendly
def shards_verify(
    shard_dir: Path = typer.Argument(..., help="A shard dir (single node or merged)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Re-hash every shard file and check each .idx against its .bin (training runs the same check).

    Example: [bold]clova shards verify shards/[/]
    """
    from clova_train.shards.format import verify_shard_dir

    s = verify_shard_dir(shard_dir, progress=not quiet)
    out.print(
        f"[green]ok[/]: {s['shards']} shards, {s['bytes']:,} bytes; "
        f"train {s['train']['documents']:,} documents / {s['train']['tokens']:,} tokens, "
        f"valid {s['valid']['documents']:,} documents / {s['valid']['tokens']:,} tokens"
    )


@shards_app.command("index")
@friendly
def shards_index(
    data: List[str] = typer.Argument(..., help="Shard dirs as `clova train --data` takes them (DIR or DIR:WEIGHT), in the same order."),
    cache: Path = typer.Option(..., "--cache", help="The cache dir the run will get as --data-cache (shared by every node)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="The run's --seq-len."),
    seed: int = typer.Option(1234, "--seed", help="The run's --seed."),
    samples: int = typer.Option(0, "--samples", help="Samples the run draws (steps x global batch); 0: one epoch of each dir."),
) -> None:
    """Build a run's memory-mapped sample indices ahead of the job, on one node; the ranks then only map them.

    Example: [bold]clova shards index shards/news:0.7 shards/blogs:0.3 --cache /shared/idx --seq-len 2048 --samples 73242624[/]
    """
    from clova_train.training.data.sampler import build_run_indices

    s = build_run_indices(data, cache, seq_len=seq_len, seed=seed, total_samples=samples, note=out.print)
    out.print(
        f"[green]ok[/]: {s['built']} index entries built, {s['kept']} already there, in {s['seconds']:.1f} s; "
        f"epochs per dir {s['epochs']}; pass --data-cache {s['cache']} to `clova train`"
    )
