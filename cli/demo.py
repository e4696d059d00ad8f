from __future__ import annotations

import os
import shlex
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, err_console, print_config, user_errors
from molt_cache.demo import DemoConfig


def demo(
    out_dir: Annotated[str, typer.Option(help="Where the cache, runs and report go (reused on rerun).")] = "molt-out/demo",
    dataset: Annotated[str, typer.Option(help="openclipart-sample (real drawings, 14 classes) | sample (synthetic, 4 classes)")] = "openclipart-sample",
    tiny: Annotated[bool, typer.Option(help="Tiny random encoders instead of the shipped SmolLM2 + EfficientNet-Lite0.")] = False,
    epochs: Annotated[int, typer.Option(help="Most epochs per head; early stopping after 8 without a better val metric.")] = 30,
    d_common: Annotated[int, typer.Option(help="d_c of the heads.")] = 128,
    seed: Annotated[int, typer.Option(help="Seeds training and the robustness draws.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if available, else CPU) | cpu | cuda | cuda:N")] = "auto",
):
    """Run the whole pipeline on a bundled sample: extract → train MoLT and baseline → robustness.

    The default sample is 554 real OpenClipart drawings (public domain) with their artists' words.

    Example: molt demo            (or: molt demo --tiny, on tiny random encoders; --dataset sample, synthetic)
    """
    from cli.progress import ExtractBars
    from molt_cache.demo import run_demo
    from molt_cache.encoders.shipped import ShippedWeightsMissing
    from molt_cache.robustness.report import robustness_table

    cfg = DemoConfig(out_dir=out_dir, dataset=dataset, tiny=tiny, epochs=epochs, d_common=d_common, seed=seed, device=device)
    print_config("demo", cfg)
    try:
        with user_errors(), ExtractBars(console) as bars:
            result = run_demo(cfg, log=console.print, extract_callbacks=bars.callbacks())
    except ShippedWeightsMissing as e:
        err_console.print(f"[bold red]error:[/] {e}\n"
                          "or run the demo on tiny random encoders: [bold]molt demo --tiny[/]")
        raise typer.Exit(code=2) from None
    from molt_cache.datasets.sample import perfect_reader_ceilings

    # the synthetic sample's generating factors give exact per-modality ceilings; a real sample has none
    ceilings = perfect_reader_ceilings("test") if dataset == "sample" else None
    console.print(robustness_table(result.rows, title=f"molt demo: MoLT vs baseline on {dataset} (test split)",
                                   ceilings=ceilings))
    times = Table(title="wall time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for k, v in result.seconds.items():
        times.add_row(k, f"{v:.1f}")
    times.add_row("total", f"{sum(result.seconds.values()):.1f}")
    console.print(times)
    console.print(f"cache:           {result.cache}", markup=False, highlight=False)
    for model, run in result.runs.items():
        console.print(f"{model + ' run:':<16} {run}", markup=False, highlight=False)
    console.print(f"report folder:   {result.report_dir}", markup=False, highlight=False)
    for path in result.report_files.values():
        console.print(f"  wrote {path}", markup=False, highlight=False)
    from molt_cache.datasets.sample import OPENCLIPART_SAMPLE_DIR, SAMPLE_DIR

    image, text = (SAMPLE_DIR / "images" / "img_000.jpg", "a photo of a cat") if dataset == "sample" else \
        (OPENCLIPART_SAMPLE_DIR / "images" / "animals__bat_orlando_karam_.png", "bat. mammal")
    # the bundled images live in the checkout, wherever the user runs from: shown relative to the
    # cwd when under it (short, and what the docs show), else absolute, so the hint runs as printed
    shown = os.path.relpath(image)
    if shown.startswith(".."):
        shown = str(image)
    console.print(f"next: molt predict --run {shlex.quote(str(result.runs['molt']))} --image {shlex.quote(shown)} "
                  f"--text {shlex.quote(text)}", markup=False, highlight=False)
