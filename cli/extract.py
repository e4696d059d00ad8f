from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.common import console, err_console, log_line, print_config, user_errors
from molt_cache.extract import ExtractConfig


def extract(
    dataset: Annotated[str, typer.Option(help="snli-ve | food101 | mmimdb | mmimdb-hdf5 | manifest | openclipart | sample")] = "sample",
    root: Annotated[Optional[str], typer.Option(help="The release's folder on disk (not needed for `sample`).")] = None,
    image_dir: Annotated[Optional[str], typer.Option(help="snli-ve: the Flickr30k image folder, if not under ROOT.")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Split(s) to extract (default: all).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Keep the first N pairs of each split (reader order, before dedup); recorded in the manifest.")] = None,
    text: Annotated[str, typer.Option(help="Text encoder: hf:PATH | shipped:smollm2 | tiny:llama")] = "shipped:smollm2",
    image: Annotated[str, typer.Option(help="Image encoder: open_clip:NAME | timm:NAME | shipped:efficientnet-lite0 | tiny:vit")] = "shipped:efficientnet-lite0",
    image_weights: Annotated[Optional[str], typer.Option(help="Local checkpoint for open_clip / timm towers.")] = None,
    layers: Annotated[int, typer.Option(help="L_s: last blocks kept per encoder.")] = 4,
    max_length: Annotated[Optional[int], typer.Option(help="Cap on tokens per text (default: the model's position limit and its tokenizer's model_max_length); truncated texts are counted and reported.")] = None,
    dtype: Annotated[str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")] = "auto",
    out_dir: Annotated[str, typer.Option(help="Cache folder; rerun the same command to resume.")] = "molt-out/cache",
    batch_tokens: Annotated[int, typer.Option(help="Text batch budget: longest × count.")] = 16384,
    image_batch_size: Annotated[int, typer.Option(help="Images encoded per batch.")] = 64,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers decoding images (default: min(4, cores)).")] = min(4, os.cpu_count() or 1),
    on_bad: Annotated[str, typer.Option(help="error | skip (skipped rows are listed and reported)")] = "error",
    force: Annotated[bool, typer.Option(help="Write even if free disk is below the planned bytes.")] = False,
    noise: Annotated[float, typer.Option(help="Input-level Gaussian noise p on pixels / token embeddings.")] = 0.0,
    noise_on: Annotated[str, typer.Option(help="image | text | both")] = "both",
    empty: Annotated[Optional[str], typer.Option(help="text (every text empty) | image (a blank image)")] = None,
    seed: Annotated[int, typer.Option(help="Seeds input-level noise.")] = 0,
    devices: Annotated[Optional[str], typer.Option(help="Launch one rank per entry under torchrun --standalone with these arguments: 0,1 (a GPU each), 0,0 (ranks sharing GPU 0), cpu,cpu.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Reader option KEY=VALUE, repeatable (e.g. openclipart min_items=40); recorded in the manifest.")] = None,
):
    """Run the frozen encoders once and write last-layer states to a sharded Zarr cache.

    Rerun the same command to resume; under torchrun each rank takes its share of the work units.

    Example: molt extract --dataset openclipart-sample --out-dir molt-out/demo/openclipart-sample/shipped/cache   (the bundled sample, into the folder `molt demo` uses, so it is reused)

    Example: molt extract --dataset snli-ve --root /data/snli-ve --text hf:/models/llama-7b --image open_clip:ViT-L-14 --image-weights /models/vit-l-14.bin   (a release on disk)
    """
    if devices is not None:
        options = {k: v for k, v in locals().items() if k not in ("devices", "device")}  # the parameters only
        from cli.launch import run_ranks

        with user_errors():
            if device != "auto":
                raise ValueError(f"--devices {devices} sets each rank's device; drop --device {device}")
            code = run_ranks(devices, "extract", options)
        raise typer.Exit(code)
    from cli.progress import ExtractBars
    from molt_cache.datasets.check import parse_options
    from molt_cache.extract import extract as run

    with user_errors():
        options = {**({"image_dir": image_dir} if image_dir else {}), **parse_options(option)}
        cfg = ExtractConfig(dataset=dataset, root=root, dataset_options=options,
                            splits=split or None, limit=limit, text=text, image=image, image_weights=image_weights, layers=layers, max_length=max_length,
                            dtype=dtype, device=device, out_dir=out_dir, batch_tokens=batch_tokens,
                            image_batch_size=image_batch_size, num_workers=num_workers, on_bad=on_bad, force=force,
                            noise=noise, noise_on=noise_on, empty=empty, seed=seed)
        print_config("extract", cfg)
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank_label = f" (rank {os.environ.get('RANK', 0)}/{world})" if world > 1 else ""
        with ExtractBars(err_console, rank_label) as bars:
            result = run(cfg, on_log=log_line, **bars.callbacks())
    table = Table(title="extract" + (" (cache complete, reused)" if result.reused else ""))
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (("units encoded / skipped", f"{result.units_done} / {result.units_skipped}"),
                        ("text tokens/s", f"{result.tokens_per_s:.0f}"), ("images/s", f"{result.images_per_s:.1f}"),
                        ("padding fraction", f"{100 * result.padding_fraction:.2f} %"),
                        ("bytes written (uncompressed)", f"{result.bytes_written / 2**20:.1f} MiB"),
                        ("bytes on disk", f"{result.bytes_on_disk / 2**20:.1f} MiB"),
                        ("text max length (tokens)", str(result.text_lengths.get("max_length", "-"))),
                        *((f"{split}: texts truncated / longest (tokens)", f"{s['truncated']} / {s['longest_tokens']}")
                          for split, s in result.text_lengths.get("splits", {}).items()),
                        ("seconds", f"{result.seconds:.1f}")):
        table.add_row(name, value)
    console.print(table)
    console.print(f"cache: {result.out_dir}" + ("" if result.complete else " (waiting for other ranks)"))
