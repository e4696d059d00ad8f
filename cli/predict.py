from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import console, err_console, log_line, print_config, user_errors

TABLE_ROWS = 20  # a handful: more rows go to --out / --json


@dataclasses.dataclass
class PredictConfig:
    """`molt predict`, as printed at start."""

    run: str
    input: Optional[str]
    image: Optional[str]
    text: Optional[str]
    out: Optional[str]
    top_k: int
    strategy: str
    threshold: float
    batch_size: int
    device: str
    on_bad: str


def predict(
    run: Annotated[str, typer.Option(help="Run folder from `molt train-heads` (its heads and the encoders of its cache are loaded).")],
    input: Annotated[Optional[str], typer.Option("--input", help="JSONL or CSV with columns id (optional), image (path relative to the file), text; either may be empty.")] = None,
    image: Annotated[Optional[str], typer.Option(help="One image file to classify (with or without --text).")] = None,
    text: Annotated[Optional[str], typer.Option(help="One text to classify (with or without --image).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write one JSON line per input here (refused if it exists, unless --force).")] = None,
    top_k: Annotated[int, typer.Option(help="Labels kept per input, most probable first.")] = 5,
    strategy: Annotated[str, typer.Option(help="An absent modality as: zero | empty (empty text / blank image through the encoder) | translate")] = "zero",
    threshold: Annotated[float, typer.Option(help="Multi-label runs: a label is predicted where its sigmoid probability exceeds this.")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Inputs encoded per batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    on_bad: Annotated[str, typer.Option(help="error | skip (rows with neither modality or an unreadable image are listed and reported)")] = "error",
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON lines to stdout (for scripts) instead of a table.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out file.")] = False,
    text_encoder: Annotated[Optional[str], typer.Option(help="Override the run's text encoder spec (a model folder that moved); checked against the run.")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(help="Override the run's image encoder spec; checked against the run.")] = None,
    image_weights: Annotated[Optional[str], typer.Option(help="Override the run's image tower checkpoint; checked against the run.")] = None,
):
    """Classify new image–text pairs with a trained run; either modality may be absent per input.

    Example: molt predict --run molt-out/demo/openclipart-sample/shipped/runs/molt --image data/openclipart_sample/images/animals__bat_orlando_karam_.png --text "bat. mammal"   (the MoLT run `molt demo` trained)

    Example: molt predict --run molt-out/demo/openclipart-sample/shipped/runs/molt --text "a red car on a road"   (text only)

    Example: molt predict --run molt-out/demo/openclipart-sample/shipped/runs/molt --input data/openclipart_sample/manifest.jsonl --out preds.jsonl   (a file of pairs, JSON lines out)
    """
    from molt_cache.predict import Classifier, PredictInput, read_inputs

    cfg = PredictConfig(run=run, input=input, image=image, text=text, out=out, top_k=top_k, strategy=strategy,
                        threshold=threshold, batch_size=batch_size, device=device, on_bad=on_bad)
    print_config("predict", cfg, to=err_console if json_out else console)
    with user_errors():
        if (input is None) == (image is None and text is None):
            raise ValueError("pass either --input FILE or --image PATH and/or --text TEXT")
        out_path = Path(out) if out else None
        if out_path is not None and out_path.exists() and not force:
            raise FileExistsError(f"{out_path} exists; choose another --out or pass --force")
        if input is not None:
            rows, bad = read_inputs(input, on_bad=on_bad)
        else:
            rows, bad = [PredictInput(id="1", image=image, text=text, source="command line")], []
        clf = Classifier.from_run(run, device=device, strategy=strategy, batch_size=batch_size, threshold=threshold,
                                  text=text_encoder, image=image_encoder, image_weights=image_weights)
        progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True,
                            disable=not err_console.is_terminal)
        task = progress.add_task("predict", total=len(rows))
        with progress:
            result = clf.predict_rows(rows, top_k=top_k, on_bad=on_bad, bad_rows=bad,
                                      on_progress=lambda done, total: progress.update(task, completed=done))
        written = []
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_name(out_path.name + ".tmp")
            with tmp.open("w") as f:
                for p in result.predictions:
                    f.write(json.dumps(p.to_json()) + "\n")
            tmp.replace(out_path)  # atomic: a crash never leaves half a file under the final name
            written.append(out_path)
            if result.bad_rows:
                bad_path = out_path.with_name(out_path.stem + ".bad_rows.json")
                bad_path.write_text(json.dumps([r.__dict__ for r in result.bad_rows], indent=1) + "\n")
                written.append(bad_path)
    if json_out:
        for p in result.predictions:
            typer.echo(json.dumps(p.to_json()))
    else:
        console.print(prediction_table(result, clf.labels, TABLE_ROWS))
        if len(result.predictions) > TABLE_ROWS:
            console.print(f"showing {TABLE_ROWS} of {len(result.predictions)} inputs; "
                          + ("all are in the file below" if out_path else "pass --out FILE or --json for all"))
    if result.bad_rows:
        first = result.bad_rows[0]
        log_line(f"{len(result.bad_rows)} bad rows skipped (first: {first.source}: {first.reason})")
    for path in written:
        log_line(f"wrote {path}")


def prediction_table(result, labels: list[str], limit: int) -> Table:
    """The first `limit` predictions: what each input held, the predicted label(s), the top-k."""
    kind = (f"multi-label: sigmoid per label, predicted where > {result.predictions[0].threshold}"
            if result.multi_label and result.predictions else
            "single-label: softmax over the labels, predicted = the most probable")
    table = Table(title=f"predictions ({kind}; absent modality: {result.strategy})",
                  caption="inputs: T = text, I = image; top-k = labels with their probability, most probable first")
    table.add_column("id")
    table.add_column("inputs")
    table.add_column("predicted")
    table.add_column("top-k")
    for p in result.predictions[:limit]:
        present = "+".join(k for k, name in (("T", "text"), ("I", "image")) if p.present[name])
        table.add_row(p.id, present, ", ".join(p.predicted) or "(none above threshold)",
                      "  ".join(f"{lab} {100 * pr:.1f}%" for lab, pr in zip(p.labels, p.probabilities)))
    return table
