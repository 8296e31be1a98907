"""The CLI's help and the README stay true: snapshots of --help, and every README command parses.

Set CLOVA_UPDATE_SNAPSHOTS=1 to rewrite the help snapshots after a deliberate change.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from clova_train.cli import app

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots"
ENV = {"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
runner = CliRunner()

COMMANDS = [
    [],
    ["demo"],
    ["dedup"],
    ["tokenizer"],
    ["tokenizer", "train"],
    ["tokenizer", "show"],
    ["tokenizer", "stats"],
    ["tokenize"],
    ["tokenize", "merge"],
    ["shards", "inspect"],
    ["shards", "verify"],
    ["shards", "index"],
    ["plan"],
    ["train"],
    ["export"],
    ["generate"],
    ["eval"],
    ["ptune"],
    ["serve"],
]


def _help(args: list[str]) -> str:
    r = runner.invoke(app, [*args, "--help"], env=ENV, terminal_width=100)
    assert r.exit_code == 0, r.output
    return "\n".join(line.rstrip() for line in r.output.splitlines()).strip() + "\n"


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a) or "clova")
def test_help_snapshot(args):
    text = _help(args)
    path = SNAPSHOTS / f"help_{'_'.join(args) or 'clova'}.txt"
    if os.environ.get("CLOVA_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if not path.exists():
        pytest.fail(f"missing snapshot {path.name}; run the tests once with CLOVA_UPDATE_SNAPSHOTS=1 and commit it")
    assert text == path.read_text(encoding="utf-8"), f"--help of {' '.join(args)} changed; update with CLOVA_UPDATE_SNAPSHOTS=1"


def test_every_command_has_a_summary_and_an_example():
    top = _help([])
    for name in ("demo", "dedup", "tokenizer", "tokenize", "shards", "plan", "train", "export", "generate", "eval", "ptune", "serve"):
        assert re.search(rf"^\W*{name}\s+\S", top, re.M), f"{name} lacks a one-line summary in clova --help"
    for args in COMMANDS:
        if args and args[0] not in ("tokenizer", "shards") or len(args) > 1:
            assert "Example" in _help(args) or "example" in _help(args), f"{' '.join(args)} --help shows no example"


def readme_commands() -> list[str]:
    """Every `clova ...` line inside the README's fenced shell blocks, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("clova "):
                out.append(line)
    return out


def _parse(argv: list[str]) -> None:
    """Parse argv the way `clova` would, down to the leaf command, without running it."""
    cmd: click.Command = typer.main.get_command(app)
    ctx = cmd.make_context("clova", list(argv), resilient_parsing=False)
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, ctx.protected_args + ctx.args)
        cmd = sub
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
        if isinstance(cmd, click.Group) and not (ctx.protected_args + ctx.args):
            break


def test_readme_lists_commands():
    cmds = readme_commands()
    assert len(cmds) >= 10
    assert any(c.startswith("clova train ") for c in cmds) and any(c.startswith("clova export ") for c in cmds)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    argv = shlex.split(line)[1:]
    try:
        _parse(argv)
    except click.UsageError as e:
        pytest.fail(f"README command no longer parses: {line}\n{e.format_message()}")


@pytest.mark.parametrize("line", [c for c in readme_commands() if c.startswith("clova plan ")])
def test_readme_plan_commands_run(line):
    r = runner.invoke(app, shlex.split(line)[1:], env=ENV)
    assert r.exit_code == 0, r.output
    assert "fits" in r.output
