from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import console, parse_float_list, parse_int_list, parse_list, print_config, user_errors
from molt_cache.sweep import SweepConfig


def sweep(
    cache: Annotated[list[str], typer.Option("--cache", help="Cache folder(s) from `molt extract`.")],
    variants: Annotated[str, typer.Option(help="molt,baseline,text-only,image-only,ablate:cca,ablate:cross-attn,ablate:M,ablate:fusion,ablate:fbp,reg:bridge,...")] = "molt,baseline",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    out_dir: Annotated[str, typer.Option(help="Sweep folder; rerun the same command to resume.")] = "runs/sweep",
    noise: Annotated[str, typer.Option(help="Feature-level noise levels to evaluate, e.g. 0.05,0.1.")] = "",
    missing: Annotated[str, typer.Option(help="Absent modalities to evaluate: text,image | none.")] = "text,image",
    strategy: Annotated[str, typer.Option(help="zero | translate")] = "zero",
    reg_weight: Annotated[float, typer.Option(help="Weight of each reg:NAME variant's regularizer.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Most epochs per run; early stopping may end sooner (--patience).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Pairs per training batch (at least 2).")] = 64,
    d_common: Annotated[int, typer.Option(help="d_c, width of the common space. 1024 is the paper's value (sized for LLaMA-7B + ViT-L/14), 10× or more slower than 128 on a CPU; for CPU runs use 128, as the docs' examples and `molt demo` do.")] = 1024,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better val metric.")] = 5,
    device: Annotated[str, typer.Option(help="auto (CUDA if available, else CPU) | cpu | cuda | cuda:N")] = "auto",
    missing_rate: Annotated[float, typer.Option(help="Train every run with this fraction of pairs missing a modality.")] = 0.0,
    missing_type: Annotated[str, typer.Option(help="both | text | image (with --missing-rate)")] = "both",
):
    """Train every variant × seed from one cache; table of mean ± std, clean and under perturbations.

    Example: molt sweep --cache molt-out/demo/openclipart-sample/shipped/cache --variants molt,baseline --seeds 0,1 --d-common 128 --epochs 10 --out-dir runs/sweep-demo   (a few minutes on 2 CPU cores, the cache `molt demo` wrote)

    Example: molt sweep --cache molt-out/demo/openclipart-sample/shipped/cache --variants molt,baseline,ablate:cca,reg:bridge --seeds 0,1,2 --d-common 128   (the paper's Table 2 on that cache; longer)
    """
    from molt_cache.sweep import paired_differences, run_sweep, summarize, write_sweep_report

    with user_errors():
        cfg = SweepConfig(
            cache=cache, variants=parse_list(variants, "--variants"),
            seeds=parse_int_list(seeds, "--seeds"), out_dir=out_dir, noise=parse_float_list(noise, "--noise"),
            missing=[] if missing.strip() == "none" else parse_list(missing, "--missing"),
            strategy=strategy, reg_weight=reg_weight,
            train={"epochs": epochs, "batch_size": batch_size, "patience": patience, "device": device,
                   **({"missing_rate": missing_rate, "missing_type": missing_type} if missing_rate else {})},
            heads={"d_common": d_common})
        print_config("sweep", cfg)
        # one transient bar for the epoch in progress (an epoch at d_c 1024 can take minutes on CPU)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=True, disable=not console.is_terminal)
        task = progress.add_task("sweep", total=None, loss=float("nan"))

        def on_step(variant: str, seed: int, epoch: int, step: int, steps: int, loss: float) -> None:
            if step == 1:
                progress.reset(task, total=steps, description=f"{variant} seed {seed} epoch {epoch + 1}")
            progress.update(task, completed=step, loss=loss)

        with progress:
            rows = run_sweep(cfg, log=lambda line: progress.console.print(line, markup=False, highlight=False),
                             on_step=on_step)
        summary = summarize(rows)
        paths = write_sweep_report(summary, rows, cfg.out_dir)
    metrics = [k[:-5] for k in summary[0] if k.endswith("_mean")]
    table = Table(title=f"sweep over seeds {cfg.seeds} (mean ± std, %)")
    table.add_column("variant")
    table.add_column("condition")
    for m in metrics:
        table.add_column(m, justify="right")
    for s in summary:
        table.add_row(s["variant"], s["condition"],
                      *(f"{100 * s[f'{m}_mean']:.2f} ± {100 * s[f'{m}_std']:.2f}" for m in metrics))
    console.print(table)
    paired = paired_differences(rows)
    if paired:
        diff = Table(title="MoLT − baseline, paired by seed (accuracy points: mean ± std, min … max, wins/ties/losses)")
        for col in ("condition", "difference", "range", "w/t/l"):
            diff.add_column(col, justify="left" if col == "condition" else "right")
        for p in paired:
            diff.add_row(p["condition"], f"{100 * p['diff_mean']:+.2f} ± {100 * p['diff_std']:.2f}",
                         f"{100 * p['diff_min']:+.2f} … {100 * p['diff_max']:+.2f}", f"{p['wins']}/{p['ties']}/{p['losses']}")
        console.print(diff)
    console.print(f"sweep folder: {paths['json'].parent}", markup=False, highlight=False)
    for path in paths.values():
        console.print(f"  wrote {path}", markup=False, highlight=False)
