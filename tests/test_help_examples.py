"""Every `--help` example is a command that runs as printed after `molt demo`, from the repository
root: its options exist and parse, and every input it names is something the demo writes (its
cache, its runs) or a file in the repository. Examples marked "(a release on disk)" need the
user's data and are only parsed."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cli.main import app
from molt_cache.demo import DemoConfig, demo_layout

ROOT = Path(__file__).resolve().parents[1]
INPUT_OPTIONS = ("--cache", "--run", "--input", "--image", "--root")


def is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")  # typer ships its own click: duck-type its Group


def examples() -> list[tuple[str, str, bool]]:
    """(command path, example command line, needs the user's data) for every documented example."""
    group = typer.main.get_command(app)
    found = []

    def walk(cmd, path: str) -> None:
        if is_group(cmd):
            for name in cmd.list_commands(cmd.context_class(cmd)):
                walk(cmd.get_command(cmd.context_class(cmd), name), f"{path} {name}".strip())
            return
        for line in (cmd.help or "").splitlines():
            if "Example" not in line:
                continue
            m = re.search(r"Example(?: \([^)]*\))?:\s*(molt .*?)(?:\s{2,}\(|$)", line)
            assert m, f"{path}: example line without a command: {line!r}"
            found.append((path, m.group(1).strip(), "(a release on disk)" in line))

    walk(group, "")
    return found


ALL = examples()


def test_every_command_has_an_example():
    group = typer.main.get_command(app)
    commands = {p for p, _, _ in ALL}
    assert {"extract", "train-heads", "robustness", "sweep", "demo", "predict", "datasets check"} <= commands, commands
    assert len(group.list_commands(group.context_class(group))) == len({p.split()[0] for p in commands})


@pytest.mark.parametrize("path, line, needs_data", ALL, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(ALL)])
def test_example_parses_and_names_only_what_the_demo_wrote(path, line, needs_data):
    args = shlex.split(line)[1:]
    cmd = typer.main.get_command(app)
    while is_group(cmd):
        cmd = cmd.get_command(cmd.context_class(cmd), args.pop(0))
    ctx = cmd.make_context(path, list(args))  # unknown options and bad values raise here
    assert ctx.params is not None
    if needs_data:
        return
    layout = {str(p) for p in demo_layout(DemoConfig()).values()}
    for opt, value in zip(args, args[1:]):
        if opt in INPUT_OPTIONS:
            assert value in layout or (ROOT / value).exists(), (
                f"`{line}`: {opt} {value} is neither written by `molt demo` ({sorted(layout)}) nor in the repository")
