from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.common import console, user_errors

datasets_app = typer.Typer(help="List the dataset readers; check a release on disk.", no_args_is_help=True)


@datasets_app.command("list")
def list_cmd():
    """The dataset names `--dataset` accepts.

    Example: molt datasets list
    """
    from molt_cache.datasets import list_datasets

    for name in list_datasets():
        console.print(name)


@datasets_app.command("check")
def check(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `molt datasets list`).")],
    root: Annotated[Optional[str], typer.Option(help="The release's folder (a manifest file for `manifest`; omit for `sample`).")] = None,
    on_bad: Annotated[str, typer.Option(help="error | skip (skip counts, lists and reports bad rows)")] = "error",
    report_dir: Annotated[Optional[str], typer.Option(help="Folder to write the skipped rows into (REPORT_DIR/bad_rows.json); created if missing.")] = None,
    bad_report: Annotated[Optional[str], typer.Option(help="Or the exact JSON file to write them to.")] = None,
    decode_images: Annotated[bool, typer.Option(help="Decode every image too (finds corrupt JPEGs; slow).")] = False,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Reader option KEY=VALUE, repeatable (e.g. openclipart min_items=40, exclude=unsorted,special, seed=0).")] = None,
):
    """Stream a release once: pairs, unique texts and images, label histogram per split; bad rows.

    Example: molt datasets check --dataset sample --decode-images

    Example: molt datasets check --dataset snli-ve --root /data/snli-ve --on-bad skip --report-dir reports/snli-ve-check   (a release on disk)
    """
    from pathlib import Path

    from molt_cache.datasets.check import check_dataset, parse_options, text_length_quantiles

    with user_errors():
        if report_dir and bad_report:
            raise ValueError("pass --report-dir DIR or --bad-report FILE, not both")
        report = Path(bad_report) if bad_report else Path(report_dir) / "bad_rows.json" if report_dir else None
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
        counts, reader = check_dataset(dataset, root, on_bad=on_bad, report_path=str(report) if report else None,
                                       decode_images=decode_images, **parse_options(option))
    table = Table(title=f"{dataset}: {reader.task}, {len(reader.labels)} labels")
    for col in ("split", "pairs", "unique texts", "unique images"):
        table.add_column(col, justify="right")
    for split, c in counts.items():
        table.add_row(split, str(c.pairs), str(c.texts), str(c.images))
    console.print(table)
    labels = Table(title="label histogram (pairs per label; multi-label counts every label)")
    labels.add_column("label")
    for split in counts:
        labels.add_column(split, justify="right")
    for name in reader.labels:
        labels.add_row(name, *(str(c.labels.get(name, 0)) for c in counts.values()))
    console.print(labels)
    quantiles = text_length_quantiles(counts)
    if quantiles:
        console.print("text length (words), quantiles over all pairs: "
                      + "  ".join(f"q{round(100 * q)}={v:g}" for q, v in quantiles.items()))
    removed = getattr(reader, "removed", None)
    if removed:
        console.print("removed from the texts: " + ", ".join(f"{k} {v}" for k, v in removed.items()))
    for note in getattr(reader, "notes", []) or []:
        console.print(f"[yellow]note:[/] {note}")
    rows = reader.report.rows
    if rows and report is not None:
        console.print(f"{reader.report.summary()} (listed in {report})")
    elif rows:  # nothing is written unless asked: the current folder is not a report folder
        console.print(f"{reader.report.summary()}; the first {min(5, len(rows))}:")
        for r in rows[:5]:
            console.print(f"  {r.source}: {r.reason}", markup=False, highlight=False)
        console.print("pass --report-dir DIR to write them all to DIR/bad_rows.json")
    else:
        console.print(reader.report.summary())
