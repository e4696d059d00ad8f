"""`molt cache verify PATH` and `molt cache info PATH`: render molt_cache/cache/integrity.py."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from cli.common import console, err_console, user_errors

cache_app = typer.Typer(help="Check and describe feature caches.", no_args_is_help=True)


@cache_app.command("verify")
def verify(path: Annotated[str, typer.Argument(help="Cache folder made by `molt extract`.")]):
    """Read every chunk, check every checksum, content hash and required file; exit 1 on any fault.

    Example: molt cache verify caches/sample
    """
    from molt_cache.cache.integrity import repair_hint, verify_cache

    progress = Progress(TextColumn("[bold]verify[/] {task.fields[array]}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=err_console, transient=True)
    task = progress.add_task("verify", total=None, array="")
    with user_errors(), progress:
        report = verify_cache(path, on_total=lambda n: progress.update(task, total=n),
                              on_progress=lambda name, n: progress.update(task, advance=n, array=name))
    table = Table(title=f"molt cache verify {escape(path)}")
    for col, just in (("array", "left"), ("files", "right"), ("bytes", "right"), ("result", "left")):
        table.add_column(col, justify=just)
    for a in report.arrays:
        table.add_row(a.name, str(a.files), f"{a.bytes:,}",
                      "[green]pass[/]" if a.ok else f"[red]FAIL ({len(a.faults)})[/]")
    table.add_row("[bold]total", str(report.files), f"{report.bytes:,}",
                  "[green]pass[/]" if report.ok else "[red]FAIL[/]")
    console.print(table)
    if not report.ok:
        for fault in report.all_faults():
            err_console.print(f"[bold red]fault:[/] {escape(fault)}")
        err_console.print(escape(repair_hint(path)))
        raise typer.Exit(code=1)
    console.print(f"{escape(path)}: every chunk present and every checksum and content hash matches")


@cache_app.command("info")
def info(path: Annotated[str, typer.Argument(help="Cache folder made by `molt extract`.")]):
    """Splits, counts, encoders, bytes and format version of a cache (reads only its manifest).

    Example: molt cache info caches/sample
    """
    from molt_cache.cache.integrity import cache_info

    with user_errors():
        i = cache_info(path)
    console.print(f"[bold]{escape(i['path'])}[/]  format version {i['format_version']}, "
                  f"{'complete' if i['complete'] else '[yellow]unfinished[/]'}, "
                  f"{i['bytes'] / 2**20:.1f} MiB on disk")
    console.print(f"dataset {i['dataset']} ({i['task']}, {i['labels']} labels), perturbation "
                  f"{escape(str(i['perturbation']))}")
    for modality in ("text", "image"):
        e = i[modality]
        console.print(f"{modality}: {e.get('kind')}:{e.get('name')} layers {e.get('layer_indices')} "
                      f"widths {e.get('layer_widths')} {e.get('dtype')}")
    table = Table()
    for col in ("split", "pairs", "texts", "images", "text_tokens", "image_tokens"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, c in i["splits"].items():
        table.add_row(split, *(f"{c.get(k, 0):,}" for k in ("pairs", "texts", "images", "text_tokens", "image_tokens")))
    console.print(table)
