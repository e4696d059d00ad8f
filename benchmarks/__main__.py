"""`python -m benchmarks <name>`: run one benchmark and update its section of docs/benchmarks.md."""
from __future__ import annotations

import sys

BENCHMARKS = {"extract": "benchmarks.bench_extract", "train": "benchmarks.bench_train", "cca": "benchmarks.bench_cca",
              "gpu": "benchmarks.bench_gpu",
              "checksum": "benchmarks.bench_checksum", "finite": "benchmarks.bench_finite",
              "scale": "benchmarks.bench_scale", "grouping": "benchmarks.bench_grouping",
              "guard": "benchmarks.bench_step_guard", "packing": "benchmarks.bench_text_packing"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: python -m benchmarks <name> [options]; valid names: {sorted(BENCHMARKS)}"
                         " (the loader benchmark runs as `python -m benchmarks.bench_loader`)")
    import importlib

    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
