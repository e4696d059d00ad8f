"""What every command shares: consoles, printing configs, turning library errors into exit code 2."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

# soft_wrap: rich never inserts line breaks into printed lines (a terminal still wraps them
# visually), so paths and commands stay whole when copied or when output goes to a log file.
# Tables and panels still fit the width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def log_line(line: str) -> None:
    """A library log line (plain text: brackets in paths are not rich markup), to stderr."""
    err_console.print(line, markup=False, highlight=False)


def print_config(title: str, *configs, to: Console | None = None) -> None:
    """Print the resolved config at start (what runs is what you see), one line per config;
    `to` another console (stderr, when stdout carries JSON for scripts)."""
    out = to or console
    lines = []
    for c in configs:
        fields = "  ".join(f"{k}={json.dumps(v, default=str)}" for k, v in dataclasses.asdict(c).items())
        lines.append((type(c).__name__, fields))
    if not out.is_terminal:  # a log file: whole lines, no box to crop or wrap them
        for name, fields in lines:
            out.print(f"{title}: {name}  {fields}", markup=False, highlight=False)
        return
    out.print(Panel("\n".join(f"[bold]{name}[/]  {escape(fields)}" for name, fields in lines), title=title,
                    expand=False), soft_wrap=False)


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
