"""What every command shares: consoles, printing configs, turning library errors into exit code 2."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

T = TypeVar("T")

# soft_wrap: rich never inserts line breaks into printed lines (a terminal still wraps them
# visually), so paths and commands stay whole when copied or when output goes to a log file.
# Tables and panels still fit the width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def log_line(line: str) -> None:
    """A library log line (plain text: brackets in paths are not rich markup), to stderr."""
    err_console.print(line, markup=False, highlight=False)


def print_config(title: str, *configs, to: Console | None = None, from_cache: tuple[str, ...] = ()) -> None:
    """Print the resolved config at start (what runs is what you see), one line per config;
    `to` another console (stderr, when stdout carries JSON for scripts); `from_cache` the fields
    the library fills from the cache after this is printed (their placeholder would mislead)."""
    out = to or console
    lines = []
    for c in configs:
        fields = "  ".join(f"{k}=" + ("(from the cache)" if k in from_cache else json.dumps(v, default=str))
                           for k, v in dataclasses.asdict(c).items())
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


def parse_list(text: str, option: str, convert: Callable[[str], T] = str, kind: str = "names") -> list[T]:
    """The comma-separated items of `option`; "" is no items. An empty item (`0.05,,0.2`, a
    trailing comma) or a repeated one (`0.05,0.05`) is refused rather than dropped or run twice:
    either is most likely a typo, and a repeat would train or evaluate the same thing again."""
    items = [x.strip() for x in text.split(",")]
    if items == [""]:
        return []
    if "" in items:
        raise ValueError(f"{option} {text!r} has an empty item; give comma-separated {kind}, e.g. {option} "
                         f"{','.join(x for x in items if x)}")
    try:
        values = [convert(x) for x in items]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated {kind}, got {text!r}") from None
    repeated = [x for i, (x, v) in enumerate(zip(items, values)) if v in values[:i]]
    if repeated:
        raise ValueError(f"{option} {text!r} repeats {', '.join(repeated)}; give each value once")
    return values


def parse_float_list(text: str, option: str) -> list[float]:
    return parse_list(text, option, float, "numbers")


def parse_int_list(text: str, option: str) -> list[int]:
    return parse_list(text, option, int, "integers")
