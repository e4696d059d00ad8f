"""What every command shares: consoles, printing configs, turning library errors into exit code 2."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

console = Console()
err_console = Console(stderr=True)


def log_line(line: str) -> None:
    """A library log line (plain text: brackets in paths are not rich markup), to stderr."""
    err_console.print(line, markup=False, highlight=False)


def print_config(title: str, *configs) -> None:
    """Print the resolved config at start (what runs is what you see), one line per config."""
    lines = []
    for c in configs:
        fields = "  ".join(f"{k}={json.dumps(v, default=str)}" for k, v in dataclasses.asdict(c).items())
        lines.append(f"[bold]{type(c).__name__}[/]  {escape(fields)}")
    console.print(Panel("\n".join(lines), title=title, expand=False))


@contextlib.contextmanager
def user_errors():
    """Library errors about the user's input become one red line and exit code 2, not a trace."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, greppable
        raise typer.Exit(code=2) from None


def parse_float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected comma-separated integers, got {text!r}") from None
