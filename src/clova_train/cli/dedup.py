"""`clova dedup`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from clova_train.cli.common import friendly, out


@friendly
def dedup_cmd(
    inputs: List[Path] = typer.Argument(..., help="Corpus: .txt, .jsonl[.gz|.zst], .parquet, or saved `datasets` dirs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output dir (jsonl.zst parts + manifest.json); rerunning into it resumes."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Estimated Jaccard at which a candidate pair is a near-duplicate (default 0.6).", rich_help_panel="MinHash-LSH"),
    ngram: Optional[int] = typer.Option(None, "--ngram", help="Shingle size in morphemes (default 3; see the README's recall curve).", rich_help_panel="MinHash-LSH"),
    bands: Optional[int] = typer.Option(None, "--bands", help="LSH bands (default 20).", rich_help_panel="MinHash-LSH"),
    rows: Optional[int] = typer.Option(None, "--rows", help="Minhashes per band (default 5: 100 hashes, P(candidate | J=0.7) = 0.975).", rich_help_panel="MinHash-LSH"),
    shingle: Optional[str] = typer.Option(None, "--shingle", help="'morpheme' (MeCab-ko, default) or 'eojeol' (whitespace words).", rich_help_panel="MinHash-LSH"),
    line_partitions: Optional[int] = typer.Option(None, "--line-partitions", help="Tasks the boilerplate line count is split over (default 16); each holds 1/N of all (document, line) keys, about 24 bytes a key while counting: 1024 for 1e11 lines takes 2.3 GB a task.", rich_help_panel="Quality"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Quality thresholds, e.g. recipes/korean_quality.json (default: its values).", rich_help_panel="Quality"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the minhash permutations and of the removed-document sample.", rich_help_panel="MinHash-LSH"),
    text_key: Optional[str] = typer.Option(None, "--text-key", help="Text field in jsonl/parquet/datasets inputs.", rich_help_panel="Input"),
    doc_sep: Optional[str] = typer.Option(None, "--doc-sep", help=".txt documents: 'line' or 'blank' (blank-line separated).", rich_help_panel="Input"),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="'raise' (default) or 'skip' bad documents, counted by reason.", rich_help_panel="Input"),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="A longer document is bad input (default 4M).", rich_help_panel="Input"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Tasks run at once (0: all cores); the output is the same for any count."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="Run every stage as Slurm array jobs on this partition (datatrove's Slurm executor); see cli/slurm_dedup.sbatch.", rich_help_panel="Many machines"),
    slurm_time: Optional[str] = typer.Option(None, "--slurm-time", help="Time limit of each Slurm job (default 24:00:00).", rich_help_panel="Many machines"),
    slurm_cpus: Optional[int] = typer.Option(None, "--slurm-cpus-per-task", help="CPUs per Slurm task (default 1; more gives a task more memory).", rich_help_panel="Many machines"),
    slurm_mem: Optional[int] = typer.Option(None, "--slurm-mem-per-cpu", help="Memory per CPU of each Slurm task, in GB (default 4).", rich_help_panel="Many machines"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Remove near-duplicates (MinHash-LSH on MeCab-ko morpheme 3-grams), non-Korean and low-quality text, before `clova tokenize`.

    Example: [bold]clova dedup corpus/*.jsonl.zst --out clean/[/], then [bold]clova tokenize clean/ --tokenizer tok/ --out shards/[/]
    """
    from clova_train.core.config import override
    from clova_train.dedup.config import DedupConfig
    from clova_train.dedup.run import SlurmOptions, dedup_corpus

    cfg = override(
        DedupConfig(),
        threshold=threshold,
        ngram=ngram,
        bands=bands,
        rows=rows,
        shingle=shingle,
        seed=seed,
        text_key=text_key,
        doc_sep=doc_sep,
        on_error=on_error,
        max_chars=max_chars,
        workers=workers,
        line_partitions=line_partitions,
    )
    slurm = None
    if slurm_partition:
        slurm = override(SlurmOptions(partition=slurm_partition), time=slurm_time, cpus_per_task=slurm_cpus, mem_per_cpu_gb=slurm_mem)
    report = dedup_corpus(inputs, out_dir, cfg, recipe, show_progress=not quiet, slurm=slurm)
    if report.get("submitted"):
        out.print(f"submitted {len(report['stages'])} Slurm stages ({', '.join(report['stages'])}); {out_dir}/manifest.json appears when the last one ends")
        return
    t = report["totals"]
    title = f"{out_dir} was already complete; nothing to do" if report["already_complete"] else f"clean corpus written to {out_dir}"
    table = Table(title=title, show_header=False)
    table.add_row("documents read", f"{t['documents_read']:,} from {report['inputs']:,} inputs")
    table.add_row("kept", f"{t['documents_kept']:,}")
    table.add_row("removed", f"{t['documents_removed']:,}")
    for reason, n in t["removed"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row("boilerplate lines stripped", f"{t['boilerplate_lines_stripped']:,}")
    if not report["already_complete"]:
        table.add_row("speed", f"{report['mb_per_s']:,.2f} MB/s with {cfg.workers or 'all'} workers")
    table.add_row("inspect", f"{out_dir}/samples.jsonl (removed, by reason), {out_dir}/duplicates.jsonl.zst (kept id of each)")
    out.print(table)
