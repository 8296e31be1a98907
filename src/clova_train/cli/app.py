"""The `clova` app: one Typer application, each command registered from its group's module.

Each command parses its flags, builds a config, calls one library function
and prints the result. A :class:`ClovaError` becomes one red line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup, TyperOption

from clova_train.cli import data, dedup, demo, evaluation, export, inference, serve, tokenizer, train


# Typer labels every on/off flag `<bool>` in --help, which reads as if `--stream` took a value; a
# flag's type column stays empty, as in click's own help. The one place Typer lets us say so.
_typed_label = TyperOption.display_type_rich
TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _typed_label(self, ctx)


class _PipelineOrder(TyperGroup):
    """List commands in pipeline order rather than definition order."""

    ORDER = ("demo", "dedup", "tokenizer", "tokenize", "shards", "plan", "train", "export", "generate", "eval", "ptune", "serve")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))


app = typer.Typer(
    name="clova",
    cls=_PipelineOrder,
    add_completion=False,
    help="Pre-train a Korean GPT-3-class model the HyperCLOVA way, and hand it to Hugging Face.\n\n"
    "Pipeline: dedup -> tokenizer train -> tokenize -> train -> export -> generate / eval / ptune / serve.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("dedup", no_args_is_help=True)(dedup.dedup_cmd)
app.add_typer(tokenizer.app, name="tokenizer")
app.command("tokenize", cls=data.TokenizeCommand, no_args_is_help=True)(data.tokenize)
app.add_typer(data.shards_app, name="shards")
app.command("plan")(train.plan_cmd)
app.command("train", no_args_is_help=True)(train.train_cmd)
app.command("export")(export.export_cmd)
app.command("generate", no_args_is_help=True)(inference.generate_cmd)
app.command("eval", no_args_is_help=True)(evaluation.eval_cmd)
app.command("ptune", no_args_is_help=True)(evaluation.ptune_cmd)
app.command("serve", no_args_is_help=True)(serve.serve_cmd)
app.command("demo")(demo.demo_cmd)
