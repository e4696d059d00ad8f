from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from cli.common import console, parse_list, print_config, user_errors
from molt_cache.config import HeadsConfig, TrainConfig


def train_heads(
    cache: Annotated[list[str], typer.Option("--cache", help="Cache folder from `molt extract`; repeat to mix caches of one dataset.")],
    run_dir: Annotated[str, typer.Option(help="Folder for config, checkpoint, metrics and log.")] = "runs/molt",
    model: Annotated[str, typer.Option(help="molt | baseline | text-only | image-only (the same fusion and classifier reading one modality: the ceiling a fused model can reach when the other is absent).")] = "molt",
    ablate: Annotated[str, typer.Option(help="Comma-separated parts to remove: cross-attn,cca,M,fusion,fbp.")] = "",
    d_common: Annotated[int, typer.Option(help="d_c, width of the common space. 1024 is the paper's value (sized for LLaMA-7B + ViT-L/14), 10× or more slower than 128 on a CPU; for CPU runs use 128, as the docs' examples and `molt demo` do.")] = 1024,
    layers: Annotated[int, typer.Option(help="L_s, selected layers (must match the cache).")] = 4,
    fbp_stride: Annotated[int, typer.Option(help="s, FBP sum-pool stride.")] = 4,
    fbp_signed_sqrt: Annotated[bool, typer.Option(help="Signed square root before FBP's L2 norm.")] = False,
    epochs: Annotated[int, typer.Option(help="Most epochs to train; early stopping may end sooner (--patience).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Pairs per training batch (at least 2: the CCA loss needs two).")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper's 4e-4).")] = 4e-4,
    alpha: Annotated[float, typer.Option(help="Weight of L_CCA.")] = 0.1,
    beta: Annotated[float, typer.Option(help="Weight of the task loss.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Seeds the heads' initialization, the batch order and the missing / noise draws; train 3+ seeds and compare paired by seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    amp: Annotated[str, typer.Option(help="auto (fp16 on CUDA, off on CPU) | off | fp16 | bf16")] = "auto",
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better val metric.")] = 5,
    store: Annotated[str, typer.Option(help="Where the features are held: auto (the fastest that fits, printed) | device | host (RAM, pinned for a GPU) | stream (from disk).")] = "auto",
    in_memory: Annotated[bool, typer.Option(help="Alias of --store host.")] = False,
    pairs_per_image: Annotated[int, typer.Option(help="K > 0: training batches hold B/K images with K of their pairs each (image work shared); 0 = i.i.d. pairs.")] = 0,
    num_workers: Annotated[int, typer.Option(help="Background loader workers.")] = 0,
    missing_rate: Annotated[float, typer.Option(help="Train with this fraction of pairs missing a modality (0.5 with --missing-type both: the recommended setting when a modality can be missing at test time; docs/heads.md).")] = 0.0,
    missing_type: Annotated[str, typer.Option(help="both | text | image")] = "both",
    train_noise: Annotated[float, typer.Option(help="Feature-level Gaussian noise p during training.")] = 0.0,
    train_noise_on: Annotated[str, typer.Option(help="image | text | both")] = "both",
    reg: Annotated[Optional[str], typer.Option(help="Latent-structure regularizers, e.g. separation=0.1,bridge=0.1,geometric=0.1")] = None,
):
    """Train the MoLT (or baseline) heads from a feature cache; never loads an encoder.

    On real data (docs/results.md: OpenClipart, shipped encoders, 3 seeds) MoLT beat the baseline by ~1 point clean and ~4 with the image absent but was worse and seed-unstable with the text absent (-4 zero-filled, -17 as an empty string); --missing-rate 0.5 --missing-type both bought +4.5 to +5 points with the image absent and put MoLT ahead on every seed. If a modality can be missing at test time, use both, and feed a missing text as zero-filled states.

    Train 3+ seeds, compare paired by seed, and read fused models against --model text-only / image-only (the accuracy reachable with one modality).

    Example: molt train-heads --cache molt-out/demo/openclipart-sample/shipped/cache --run-dir runs/molt --d-common 128 --epochs 30   (the cache `molt demo` wrote)
    """
    from molt_cache.train import train_heads as run

    with user_errors():
        reg_weights = {}
        if reg:
            from molt_cache.losses.structure import parse_reg_spec

            reg_weights = parse_reg_spec(reg)
        heads_cfg = HeadsConfig(model=model, d_common=d_common, layers=layers, fbp_stride=fbp_stride,
                                fbp_signed_sqrt=fbp_signed_sqrt,
                                ablate=parse_list(ablate, "--ablate"))
        cfg = TrainConfig(cache=cache, run_dir=run_dir, epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha,
                          beta=beta, seed=seed, device=device, amp=amp, patience=patience, in_memory=in_memory,
                          store=store, pairs_per_image=pairs_per_image,
                          num_workers=num_workers, missing_rate=missing_rate, missing_type=missing_type,
                          train_noise=train_noise, train_noise_on=train_noise_on, reg=reg_weights)
        print_config("train-heads", cfg, heads_cfg, from_cache=("num_classes", "multi_label"))

        progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=True)
        task = progress.add_task("train", total=None, epoch=0, loss=float("nan"))

        def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
            if step == 1:
                progress.reset(task, total=steps)
            progress.update(task, completed=step, epoch=epoch, loss=loss)

        def on_epoch(rec: dict) -> None:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float) and k != "seconds")
            progress.console.print(f"epoch {rec['epoch']:3d}  {shown}  {rec['seconds']:.1f}s"
                                   + ("  [green]best[/]" if rec["best"] else ""))

        with progress:
            result = run(cfg, heads_cfg, on_epoch=on_epoch, on_step=on_step, on_info=progress.console.print)
    table = Table(title=f"{model} heads: best epoch {result.best_epoch} of {result.epochs_run} ({result.seconds:.1f}s)")
    table.add_column("split")
    keys = list(result.val)
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in (("val", result.val), ("test", result.test)):
        if m:
            table.add_row(name, *(f"{100 * m[k]:.2f}" for k in keys))
    console.print(table)
    console.print(f"run folder: {result.run_dir}")
