"""`clova eval` and `clova ptune`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clova_train.cli.common import _DEVICE_HELP, _DTYPE_HELP, _MODEL_HELP, _str, existing_dir, friendly, out
from clova_train.core.errors import ClovaError


def _metric(name: str, value: float) -> str:
    """Scores are percentages (0-100) except BLEU, which has its own 0-100 scale."""
    return f"{value:.2f}" if name == "bleu" else f"{value:.2f}%"


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
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Results JSON (default eval-TASK-Kshot.json, or eval-TASK-ptuned.json with --ptune)."),
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
    existing_dir(model_dir, "model directory")
    from clova_train.core.config import override
    from clova_train.evaluation.evaluate import EvalConfig, evaluate
    from clova_train.inference.generate import load_model

    cfg = override(
        EvalConfig(task=task, data=str(data)),
        train=_str(train), shots=shots, seed=seed, limit=limit, template=_str(template), ptune=_str(ptune_dir),
        score=score, batch_tokens=batch_tokens, batch_size=batch_size, out=_str(out_file),
    )
    model, tok = load_model(model_dir, device=device, dtype=dtype)
    result = evaluate(model, tok, cfg, model_name=str(model_dir), show_progress=not quiet)
    table = Table(title=f"{result['task']}, {cfg.setting}", show_header=False)
    table.add_row("task family", result["family"])
    table.add_row("examples", f"{result['examples_scored']:,}")
    for name, value in result["metrics"].items():
        table.add_row(name.replace("_", " "), _metric(name, value))
    out.print(table)
    out.print(f"every prompt, score and prediction: {result['out']}", highlight=False, soft_wrap=True)


@friendly
def ptune_cmd(
    model_dir: Optional[Path] = typer.Argument(None, metavar="MODEL", help=_MODEL_HELP + " Not with --server."),
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
    server: Optional[str] = typer.Option(None, "--server", help="Train here with the loss and input gradients of this `clova serve` (no weights needed; classification tasks)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CLOVA_API_KEY", show_envvar=True, help="The server's API key (with --server)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """P-tuning: train continuous prompt vectors (LSTM or MLP encoder) in front of the frozen model.

    Example: [bold]clova ptune hf/ --task nsmc --train ratings_train.txt --valid ratings_valid.txt --out nsmc-ptune/[/]
    then [bold]clova eval hf/ --task nsmc --data ratings_test.txt --ptune nsmc-ptune/[/]; without the weights:
    [bold]clova ptune --server http://host:8000 --task nsmc ...[/] (the same options and output directory)
    """
    if (model_dir is None) == (server is None):
        raise ClovaError("give MODEL (a model directory) or --server URL (a `clova serve` that computes the gradients), one of them")
    if model_dir is not None:
        existing_dir(model_dir, "model directory")
    from clova_train.core.config import override
    from clova_train.inference.generate import load_model
    from clova_train.evaluation.ptune import PTuneConfig, ptune

    cfg = override(
        PTuneConfig(task=task, train=str(train), valid=str(valid), out=str(out_dir)),
        prompt_tokens=prompt_tokens, encoder=encoder, hidden_size=hidden_size, lr=lr, weight_decay=weight_decay,
        epochs=epochs, batch_size=batch_size, seed=seed, template=_str(template), score=score,
    )
    if server is not None:
        from clova_train.studio.remote import ptune_remote

        report = ptune_remote(server, api_key or "", cfg, show_progress=not quiet)
    else:
        model, tok = load_model(model_dir, device=device, dtype=dtype)
        report = ptune(model, tok, cfg, model_name=str(model_dir), show_progress=not quiet)
    table = Table(title=f"p-tuned {cfg.task} (validation set)")
    table.add_column("")
    for name in report["best"]:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_row("zero-shot", *(_metric(k, v) for k, v in report["zero_shot"].items()))
    table.add_row(f"p-tuned (epoch {report['best_epoch']})", *(_metric(k, v) for k, v in report["best"].items()))
    out.print(table)
    out.print(f"prompt written to {report['out']}: {report['parameters']:,} trained parameters, {report['bytes'] / 1e6:.2f} MB",
              highlight=False, soft_wrap=True)
