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
from typer.core import TyperGroup
from rich.markup import escape
from rich.table import Table

from .errors import ClovaError

class _PipelineOrder(TyperGroup):
    """List commands in pipeline order rather than definition order."""

    ORDER = ("demo", "tokenizer", "tokenize", "shards", "plan", "train", "export", "generate", "eval", "ptune")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))


app = typer.Typer(
    name="clova",
    cls=_PipelineOrder,
    add_completion=False,
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
    pieces = tok.segment(text)
    table = Table(title=f"{len(pieces)} morphemes, {len(tok.encode(text))} tokens")
    table.add_column("morpheme")
    table.add_column("tokens")
    table.add_column("ids", justify="right")
    for piece in pieces:
        ids = tok.encode(piece)
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
    from .plan import ACCELERATOR_PEAK_TFLOPS, PlanConfig, estimate, plan_table, suggest

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
    out.print(plan_table(est, fixes))


# ---- tokenize / shards ------------------------------------------------------
# `clova tokenize INPUT...` and `clova tokenize merge DIR...` share one name:
# a command, not a group, because a group would swallow INPUT... as a
# subcommand name. The command hands over to the merge command when its first
# argument is "merge" (an input file literally named so: pass ./merge).

from typer.core import TyperCommand  # noqa: E402

merge_app = typer.Typer(add_completion=False)


class _TokenizeCommand(TyperCommand):
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


@app.command("tokenize", cls=_TokenizeCommand, no_args_is_help=True)
@friendly
def tokenize(
    inputs: List[Path] = typer.Argument(..., help="Corpus: .txt, .jsonl[.gz|.zst], .parquet, or saved `datasets` dirs."),
    tokenizer_dir: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer dir from `clova tokenizer train`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Shard dir; rerunning into it resumes an interrupted run."),
    config: Optional[Path] = typer.Option(None, "--config", help="A JSON ShardConfig; flags override it."),
    shard_tokens: Optional[int] = typer.Option(None, "--shard-tokens", help="Tokens per shard (default 100M).", rich_help_panel="Shards"),
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
    from .config import load_json, override
    from .shards import ShardConfig
    from .tokenize_corpus import slurm_node_slice, tokenize_corpus

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
    from .tokenize_corpus import merge_shard_dirs

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


shards_app = typer.Typer(help="Inspect and verify shard dirs made by `clova tokenize`.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("inspect")
@friendly
def shards_inspect(
    shard_dir: Path = typer.Argument(..., help="A shard dir (single node or merged)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a shard dir's manifest: tokenizer, inputs, shards, split and skipped documents.

    Example: [bold]clova shards inspect shards/[/]
    """
    from .shards import read_manifest

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
    from .shards import verify_shard_dir

    s = verify_shard_dir(shard_dir, progress=not quiet)
    out.print(
        f"[green]ok[/]: {s['shards']} shards, {s['bytes']:,} bytes; "
        f"train {s['train']['documents']:,} documents / {s['train']['tokens']:,} tokens, "
        f"valid {s['valid']['documents']:,} documents / {s['valid']['tokens']:,} tokens"
    )


# ---- export (owner: export) ---------------------------------------------------


@app.command("export")
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
    from .export import ExportConfig, export_hf

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


# ---- train (owner: train) -----------------------------------------------------


@app.command("train", no_args_is_help=True)
@friendly
def train_cmd(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run dir; rerunning into it continues the run from its newest complete checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset: tiny, small, 137m, 350m, 760m, 1.3b, 6.9b, 13b, 39b, 82b."),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help="Shard dir from `clova tokenize`, optionally DIR:WEIGHT; repeat to blend."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir (default: the one in the shards' manifest); its hash must match the shards'."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON with model/train/data/parallel sections (e.g. a run's config.json), loaded strictly; flags override it."),
    deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="DeepSpeed JSON to start from (deepspeed_configs/zero3.json, zero3_offload.json); flags override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR from its newest complete checkpoint, taking its config.json (flags override); without one, start it."),
    force: bool = typer.Option(False, "--force", help="Start even if the memory plan (printed before step 1) says the run cannot fit."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 2048).", rich_help_panel="Batch"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step over all ranks (default 1024), by gradient accumulation.", rich_help_panel="Batch"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per rank per forward pass (default 1).", rich_help_panel="Batch"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the preset's GPT-3 value).", rich_help_panel="Optimizer"),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="End of the cosine decay (default lr/10).", rich_help_panel="Optimizer"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps (default: 375M tokens, at most 10% of the run).", rich_help_panel="Optimizer"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.1).", rich_help_panel="Optimizer"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Global gradient-norm clip (default 1.0; 0: off).", rich_help_panel="Optimizer"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps to train.", rich_help_panel="Length"),
    train_tokens: Optional[float] = typer.Option(None, "--train-tokens", help="Tokens to train on, e.g. 150e9 (rounded up to whole steps).", rich_help_panel="Length"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU).", rich_help_panel="Parallelism"),
    parallel_mode: Optional[str] = typer.Option(None, "--parallel", help="zero3 (default; sharded, optional offload) or pipeline (layers in stages, ZeRO-1).", rich_help_panel="Parallelism"),
    pipeline_stages: Optional[int] = typer.Option(None, "--pipeline-stages", help="Pipeline stages with --parallel pipeline (default: one per rank).", rich_help_panel="Parallelism"),
    partition: Optional[str] = typer.Option(None, "--partition", help="How --parallel pipeline cuts layers into stages: parameters (default), uniform or type:REGEX (e.g. type:Block).", rich_help_panel="Parallelism"),
    offload: Optional[str] = typer.Option(None, "--offload", help="ZeRO-3 offload: none, cpu or nvme.", rich_help_panel="Parallelism"),
    nvme_path: Optional[str] = typer.Option(None, "--nvme-path", help="Local NVMe directory for --offload nvme.", rich_help_panel="Parallelism"),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute blocks in the backward pass.", rich_help_panel="Parallelism"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (default 1000).", rich_help_panel="Checkpoints and logs"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation loss every N steps (default 1000; 0: never).", rich_help_panel="Checkpoints and logs"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Validation sequences per evaluation (default 256).", rich_help_panel="Checkpoints and logs"),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep the newest N complete checkpoints (default 0: all).", rich_help_panel="Checkpoints and logs"),
    max_bad_steps: Optional[int] = typer.Option(None, "--max-bad-steps", help="Stop after N consecutive non-finite steps (default 5).", rich_help_panel="Checkpoints and logs"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s of one device for MFU (default: known accelerators).", rich_help_panel="Checkpoints and logs"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Progress line every N steps when not on a terminal (default 10).", rich_help_panel="Checkpoints and logs"),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="TensorBoard events in RUN_DIR/tensorboard (default on).", rich_help_panel="Checkpoints and logs"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initialisation and the sample order (default 1234).", rich_help_panel="Checkpoints and logs"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Local worker processes, one per GPU (default 1; a rerun: as many as wrote its checkpoint).", rich_help_panel="Launch"),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile: run on all its hosts (see cli/hostfile.example).", rich_help_panel="Launch"),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Rank 0's address (default: localhost or the first Slurm node).", rich_help_panel="Launch"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Rank 0's port.", rich_help_panel="Launch"),
) -> None:
    """Pre-train a GPT on shard dirs with DeepSpeed (ZeRO-3 or pipeline + ZeRO-1), resumably; under srun each task is a rank.

    Example: [bold]clova train --model 1.3b --data shards/ --out runs/1.3b --train-tokens 150e9 --nproc-per-node 8[/]
    """
    from .launch import LaunchConfig
    from .train import TrainRequest, train

    request = TrainRequest(
        out=str(out_dir),
        model=model,
        data=list(data or []),
        tokenizer=str(tokenizer) if tokenizer else None,
        config=str(config) if config else None,
        deepspeed=str(deepspeed) if deepspeed else None,
        resume=resume,
        force=force,
        train=dict(
            seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch, lr=lr, min_lr=min_lr, warmup=warmup,
            weight_decay=weight_decay, grad_clip=grad_clip, steps=steps, train_tokens=int(train_tokens) if train_tokens else None, precision=precision,
            save_every=save_every, eval_every=eval_every, eval_samples=eval_samples, keep_last=keep_last,
            max_bad_steps=max_bad_steps, peak_tflops=peak_tflops, log_every=log_every, tensorboard=tensorboard, seed=seed,
        ),
        parallel=dict(mode=parallel_mode, offload=offload, nvme_path=nvme_path, activation_checkpointing=activation_checkpointing, pipeline_stages=pipeline_stages,
                      partition=partition),
    )
    launch = LaunchConfig(nproc_per_node=nproc_per_node, hostfile=str(hostfile) if hostfile else None, master_addr=master_addr, master_port=master_port)
    code = train(request, launch)
    if code:
        raise typer.Exit(code)


# ---- end train ----------------------------------------------------------------


# ---- generate / eval / ptune (owner: generate) --------------------------------
# MODEL is an exported HF dir or a run dir (read by export.load_for_inference),
# or a dir holding model.pt + config.json + tokenizer/.

_MODEL_HELP = "An exported Hugging Face dir, a run dir, or a dir with model.pt + config.json + tokenizer/."
_DEVICE_HELP = "cpu, cuda, cuda:1, ... (auto: cuda when available)."
_DTYPE_HELP = "float32, bfloat16 or float16."


def _str(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _unescape(text: str) -> str:
    """Let `--stop '\\n'` mean a newline, as it does in HyperCLOVA Studio."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@app.command("generate", no_args_is_help=True)
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
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Complete a prompt (greedy or sampled, with a key/value cache), or every prompt of a jsonl file.

    Example: [bold]clova generate hf/ "대한민국의 수도는" --temperature 0.7 --top-p 0.9 --stop '\\n' --stream[/]
    """
    import sys

    from .config import override
    from .errors import ClovaError
    from .generate import GenerateConfig, generate, generate_file, load_model, read_lines

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
        from .progress import progress_bar

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


@app.command("eval", no_args_is_help=True)
@friendly
def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    task: str = typer.Option(..., "--task", help="nsmc, ynat, sts, korquad or translation."),
    data: Path = typer.Option(..., "--data", help="Examples to score, in the task's format."),
    train: Optional[Path] = typer.Option(None, "--train", help="Demonstrations are drawn from this file (same format)."),
    shots: Optional[int] = typer.Option(None, "--shots", "-k", help="Demonstrations per prompt (K)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the demonstration sample."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N examples."),
    template: Optional[Path] = typer.Option(None, "--template", help="A prompt template JSON (copy one from resources/templates)."),
    ptune_dir: Optional[Path] = typer.Option(None, "--ptune", help="Use the prompt trained by `clova ptune` into this dir."),
    score: Optional[str] = typer.Option(None, "--score", help="Compare label log-likelihoods by 'sum' or per-token 'mean'."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per scoring batch, padding included."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generation batch (QA, translation)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Results JSON (default eval-TASK-Kshot.json)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """In-context few-shot evaluation: label log-likelihoods (nsmc, ynat, sts) or greedy answers (korquad, translation).

    Formats: nsmc: TSV with header id<TAB>document<TAB>label (0/1); ynat: jsonl title, label (0-6 or name);
    sts: jsonl sentence1, sentence2, label (0-5) or binary_label; korquad: jsonl context, question, answers;
    translation: jsonl source, target. Every prompt, score and prediction is saved in the JSON.

    Example: [bold]clova eval hf/ --task nsmc --data ratings_test.txt --train ratings_train.txt --shots 10[/]
    """
    from .config import override
    from .evaluate import EvalConfig, evaluate
    from .generate import load_model

    cfg = override(
        EvalConfig(task=task, data=str(data)),
        train=_str(train), shots=shots, seed=seed, limit=limit, template=_str(template), ptune=_str(ptune_dir),
        score=score, batch_tokens=batch_tokens, batch_size=batch_size, out=_str(out_file),
    )
    model, tok = load_model(model_dir, device=device, dtype=dtype)
    result = evaluate(model, tok, cfg, model_name=str(model_dir), show_progress=not quiet)
    table = Table(title=f"{result['task']}, {cfg.shots}-shot", show_header=False)
    table.add_row("task family", result["family"])
    table.add_row("examples", f"{result['examples_scored']:,}")
    for name, value in result["metrics"].items():
        table.add_row(name.replace("_", " "), f"{value:.2f}")
    out.print(table)
    out.print(f"every prompt, score and prediction: {result['out']}", highlight=False)


@app.command("ptune", no_args_is_help=True)
@friendly
def ptune_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    task: str = typer.Option(..., "--task", help="nsmc, ynat, sts, korquad or translation."),
    train: Path = typer.Option(..., "--train", help="Training examples, in the task's format."),
    valid: Path = typer.Option(..., "--valid", help="Validation examples; the best epoch is kept."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output dir: the prompt encoder and ptune.json."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="Trained vectors, split between the template's {prompt} marks."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="lstm (the paper's) or mlp."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Width of the encoder."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the encoder."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training examples."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initialisation and example order."),
    template: Optional[Path] = typer.Option(None, "--template", help="A template JSON with a ptune_query."),
    score: Optional[str] = typer.Option(None, "--score", help="Label log-likelihoods compared by 'sum' or 'mean'."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """P-tuning: train continuous prompt vectors (LSTM or MLP encoder) in front of the frozen model.

    Example: [bold]clova ptune hf/ --task nsmc --train ratings_train.txt --valid ratings_valid.txt --out nsmc-ptune/[/]
    then [bold]clova eval hf/ --task nsmc --data ratings_test.txt --ptune nsmc-ptune/[/]
    """
    from .config import override
    from .generate import load_model
    from .ptune import PTuneConfig, ptune

    cfg = override(
        PTuneConfig(task=task, train=str(train), valid=str(valid), out=str(out_dir)),
        prompt_tokens=prompt_tokens, encoder=encoder, hidden_size=hidden_size, lr=lr, weight_decay=weight_decay,
        epochs=epochs, batch_size=batch_size, seed=seed, template=_str(template), score=score,
    )
    model, tok = load_model(model_dir, device=device, dtype=dtype)
    report = ptune(model, tok, cfg, model_name=str(model_dir), show_progress=not quiet)
    table = Table(title=f"p-tuned {cfg.task}: prompt written to {report['out']}")
    table.add_column("")
    for name in report["best"]:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_row("zero-shot", *(f"{v:.2f}" for v in report["zero_shot"].values()))
    table.add_row(f"p-tuned (epoch {report['best_epoch']})", *(f"{v:.2f}" for v in report["best"].values()))
    out.print(table)
    out.print(f"{report['parameters']:,} trained parameters, {report['bytes'] / 1e6:.2f} MB", highlight=False)


# ---- end generate / eval / ptune ----------------------------------------------


# ---------------------------------------------------------------- demo


@app.command("demo")
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
    from .config import override
    from .demo import DemoConfig, run_demo

    cfg = override(DemoConfig(out=str(out_dir), fresh=fresh), steps=steps, nproc=nproc, prompt=prompt)
    s = run_demo(cfg, show_progress=not quiet, log=lambda m: err.print(f"[bold cyan]demo[/] {escape(m)}", highlight=False))
    table = Table(title="clova demo: done", show_header=False)
    stage_of = {"tokenizer": "tokenizer", "shards": "shards", "run": "train", "hf": "export"}
    for key, path in s["dirs"].items():
        table.add_row(stage_of[key], f"{path}  ({s['seconds'].get(stage_of[key], 0):.1f} s)")
    t = s["tokens"]
    table.add_row("documents", f"{t.get('documents_read', 0):,} read, {t.get('documents_written', 0):,} written, "
                  + ", ".join(f"{n:,} {reason}" for reason, n in s["skipped"].items()) + " skipped")
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
        "  clova tokenizer train corpus/*.jsonl --config tokenizer/hyperclova.json --out tok/\n"
        "  clova tokenize corpus/*.jsonl --tokenizer tok/ --out shards/ --valid-fraction 0.005\n"
        "  clova plan --model 1.3b --gpus 8 --gpu-mem 80\n"
        "  clova train --model 1.3b --data shards/ --out runs/1.3b --nproc-per-node 8\n"
        f"  clova generate {d['hf']} \"{s['prompt']}\" --stream",
        highlight=False,
        soft_wrap=True,
    )
