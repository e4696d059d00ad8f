from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from cli.common import console, parse_float_list, parse_list, print_config, user_errors
from molt_cache.robustness.evaluate import RobustnessConfig


def robustness(
    run: Annotated[list[str], typer.Option("--run", help="Run folder from `molt train-heads`; repeat to compare (MoLT vs baseline; text-only / image-only runs add the unimodal ceilings).")],
    noise: Annotated[str, typer.Option(help="Gaussian noise levels p, comma-separated (0.05 = 5% of each sample's std).")] = "0.01,0.05,0.1,0.2",
    missing: Annotated[str, typer.Option(help="Absent modalities to test: text,image | text | image | none.")] = "text,image",
    level: Annotated[str, typer.Option(help="feature (on the cache) | input (pixels / token embeddings, fresh extraction) | feature,input")] = "feature",
    noise_on: Annotated[str, typer.Option(help="image | text | both")] = "both",
    strategy: Annotated[str, typer.Option(help="Absent modality as: zero | empty (input level) | translate")] = "zero",
    missing_rate: Annotated[float, typer.Option(help="Feature level: the fraction of test pairs that lose the modality in each --missing condition (the missing-aware-prompting protocol). 0, the default, means every pair loses it (the paper's Table 3).")] = 0.0,
    missing_type: Annotated[str, typer.Option(help="With --missing-rate: both adds a row where half the missing pairs lack text, half the image.")] = "both",
    seed: Annotated[int, typer.Option(help="Seeds the noise (feature and input level) and the missing-pair draws, the same for every run compared.")] = 0,
    split: Annotated[str, typer.Option(help="Split of the cache to evaluate: test | val | train.")] = "test",
    cache: Annotated[str, typer.Option(help="Evaluate on this cache instead of the one the runs were trained on.")] = "",
    device: Annotated[str, typer.Option(help="auto (CUDA if available, else CPU) | cpu | cuda | cuda:N")] = "auto",
    store: Annotated[str, typer.Option(help="Where the evaluated split's features live, as in train-heads: auto (the fastest that fits) | device | host | stream.")] = "auto",
    report_dir: Annotated[str, typer.Option(help="Folder for results.json/csv and plots.")] = "reports/robustness",
    overwrite: Annotated[bool, typer.Option(help="Replace a report already in --report-dir (refused otherwise).")] = False,
):
    """Evaluate trained heads with a modality absent or noised, like the paper's Table 3.

    Example: molt robustness --run molt-out/demo/openclipart-sample/shipped/runs/molt --run molt-out/demo/openclipart-sample/shipped/runs/baseline --noise 0.01,0.05,0.1,0.2 --level feature,input --report-dir reports/robustness   (the runs `molt demo` trained)
    """
    from cli.progress import ExtractBars
    from molt_cache.robustness.evaluate import run_robustness
    from molt_cache.robustness.report import ceiling_table, check_report_dir, robustness_table, write_report

    with user_errors():
        cfg = RobustnessConfig(
            runs=run, noise=parse_float_list(noise, "--noise"), levels=parse_list(level, "--level"),
            missing=[] if missing.strip() == "none" else parse_list(missing, "--missing"),
            noise_on=noise_on, strategy=strategy, missing_rate=missing_rate, missing_type=missing_type,
            seed=seed, split=split,
            cache=cache, device=device, store=store, report_dir=report_dir)
        print_config("robustness", cfg)
        check_report_dir(cfg.report_dir, overwrite)  # before the evaluation, not after it
        with ExtractBars(console) as bars:  # input-level conditions extract perturbed caches
            rows = run_robustness(cfg, log=console.print, extract_callbacks=bars.callbacks())
        paths = write_report(rows, cfg.report_dir, dataclasses.asdict(cfg), overwrite=overwrite)
    console.print(robustness_table(rows, title=f"Robustness on {split} (seed {seed})"))
    ceilings = ceiling_table(rows)
    if ceilings is not None:  # text-only / image-only runs given: the fused models' drop against them
        console.print(ceilings)
    console.print(f"report folder: {paths['json'].parent}", markup=False, highlight=False)
    for path in paths.values():
        console.print(f"  wrote {path}", markup=False, highlight=False)
