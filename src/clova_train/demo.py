"""`clova demo`: the whole pipeline on the Korean text shipped with konlpy, in minutes.

Each stage calls the same library function as its command and writes under
one demo directory; a rerun reuses every stage that finished (``fresh``
starts over).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from clova_train.core.errors import ClovaError


@dataclass
class DemoConfig:
    """The demo's settings: small enough for 2 CPU cores, real enough to show every stage."""

    out: str = "demo-run"
    """Directory for every stage's output."""
    fresh: bool = False
    """Start over instead of reusing finished stages."""
    vocab_size: int = 4096
    """Tokenizer vocabulary (the demo corpus is only about 140 KB)."""
    valid_fraction: float = 0.05
    """Documents held out for validation, by text hash."""
    doc_sep: str = "blank"
    """konlpy's files are paragraphs separated by blank lines: one document per paragraph."""
    model: str = "tiny"
    """Model preset."""
    seq_len: int = 128
    """Tokens per training sequence."""
    global_batch: int = 16
    """Sequences per optimizer step."""
    micro_batch: int = 4
    """Sequences per process per forward pass."""
    steps: int = 150
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak learning rate (tiny models like it high)."""
    nproc: int = 2
    """Training processes (ZeRO-3 across them)."""
    prompt: str = "대한민국 헌법은"
    """Korean prompt for the generation at the end."""
    max_new_tokens: int = 40
    """Tokens sampled from the prompt."""
    seed: int = 0
    """Seed of the training run and of the sampled continuation."""
    inputs: list[str] = field(default_factory=list)
    """Corpus files (default: konlpy's constitution and bills)."""
    dedup_min_chars: int = 10
    """The dedup stage's shortest document: konlpy's paragraphs are short (headings, article numbers)."""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "seq_len", "global_batch", "micro_batch", "steps", "nproc", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ClovaError(f"demo {f} must be >= 1, not {getattr(self, f)}")


def konlpy_corpus() -> list[Path]:
    """The real Korean text inside the konlpy package (no Java needed to read it)."""
    try:
        import konlpy
    except ImportError:
        raise ClovaError("the demo corpus comes with konlpy: pip install 'clova-train[demo]'") from None
    d = Path(konlpy.__file__).parent / "data" / "corpus"
    return [d / "kolaw" / "constitution.txt", *sorted((d / "kobill").glob("*.txt"))]


def run_demo(cfg: DemoConfig, *, show_progress: bool = True, log=print) -> dict:
    """Run (or resume) the demo pipeline; return what each stage produced."""
    from clova_train.dedup.config import DedupConfig
    from clova_train.dedup.run import dedup_corpus
    from clova_train.export.hf import ExportConfig, export_hf
    from clova_train.text.quality import QualityRecipe
    from clova_train.training.launch import LaunchConfig
    from clova_train.shards.format import ShardConfig, read_manifest
    from clova_train.shards.build import tokenize_corpus
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer
    from clova_train.training.run.config import TrainRequest
    from clova_train.training.train import train

    root = Path(cfg.out)
    if cfg.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    raw = [Path(p) for p in cfg.inputs] or konlpy_corpus()
    clean_dir, tok_dir, shard_dir, run_dir, hf_dir = root / "clean", root / "tokenizer", root / "shards", root / "run", root / "hf"
    inputs = [clean_dir]
    summary: dict = {"dirs": {}, "seconds": {}}

    def stage(name: str, done: bool, fn) -> None:
        t = time.perf_counter()
        if done:
            log(f"[{name}] reusing finished output")
        else:
            log(f"[{name}] running")
            fn()
        summary["seconds"][name] = time.perf_counter() - t

    stage(
        "dedup",
        (clean_dir / "manifest.json").exists(),
        lambda: dedup_corpus(
            raw, clean_dir, DedupConfig(doc_sep=cfg.doc_sep), QualityRecipe(min_chars=cfg.dedup_min_chars), show_progress=show_progress
        ),
    )
    stage(
        "tokenizer",
        (tok_dir / "clova_tokenizer.json").exists(),
        lambda: train_tokenizer(inputs, tok_dir, TokenizerConfig(vocab_size=cfg.vocab_size, doc_sep=cfg.doc_sep), show_progress=show_progress),
    )
    stage(
        "shards",
        (shard_dir / "manifest.json").exists(),
        lambda: tokenize_corpus(
            inputs, tok_dir, shard_dir, ShardConfig(valid_fraction=cfg.valid_fraction, doc_sep=cfg.doc_sep), show_progress=show_progress
        ),
    )

    def do_train() -> None:
        req = TrainRequest(
            out=str(run_dir),
            model=cfg.model,
            data=[str(shard_dir)],
            train={
                "seq_len": cfg.seq_len,
                "global_batch": cfg.global_batch,
                "micro_batch": cfg.micro_batch,
                "steps": cfg.steps,
                "lr": cfg.lr,
                "warmup": max(1, cfg.steps // 20),
                "save_every": cfg.steps,
                "eval_every": max(1, cfg.steps // 5),
                "eval_samples": 32,
                "log_every": 10,
                "seed": cfg.seed,
            },
            resume=True,
        )
        code = train(req, LaunchConfig(nproc_per_node=cfg.nproc))
        if code != 0:
            raise ClovaError(f"demo training exited with code {code}; see the messages above")

    metrics = run_dir / "metrics.jsonl"
    stage("train", _trained_steps(metrics) >= cfg.steps, do_train)
    stage(
        "export",
        (hf_dir / "config.json").exists(),
        lambda: export_hf(run_dir, hf_dir, ExportConfig(dtype="fp32", overwrite=True), show_progress=show_progress),
    )

    t = time.perf_counter()
    summary["generated"] = generate_with_transformers(hf_dir, cfg.prompt, cfg.max_new_tokens, cfg.seed)
    summary["seconds"]["generate"] = time.perf_counter() - t

    manifest = read_manifest(shard_dir)
    summary["dedup"] = json.loads((clean_dir / "manifest.json").read_text(encoding="utf-8"))["totals"]
    records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    train_losses = [r["loss"] for r in records if r.get("loss") is not None]
    valid_losses = [r["valid_loss"] for r in records if r.get("valid_loss") is not None]
    summary.update(
        dirs={"clean": str(clean_dir), "tokenizer": str(tok_dir), "shards": str(shard_dir), "run": str(run_dir), "hf": str(hf_dir)},
        tokens=manifest.get("totals", {}),
        skipped=manifest.get("skipped", {}).get("by_reason", {}),
        first_loss=train_losses[0] if train_losses else None,
        final_loss=train_losses[-1] if train_losses else None,
        final_valid_loss=valid_losses[-1] if valid_losses else None,
        loss_plot=str(run_dir / "loss.png"),
        prompt=cfg.prompt,
    )
    return summary


def _trained_steps(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines() if l.strip()]
    return max(steps, default=0)


def generate_with_transformers(hf_dir: Path, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A sampled continuation through plain transformers, as a user of the export would run it.

    A tiny model trained for a minute predicts end-of-document early, so the
    end token is held back for the first half of the continuation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo has its own summary; a bar for 28 tensors is noise
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens // 2,
            do_sample=True,
            temperature=0.8,
            top_k=40,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0], skip_special_tokens=True)
