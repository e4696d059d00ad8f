"""`molt sweep`: the paper's Table 2 (and the second seed's regularizers) for any cache.

Each variant × seed is trained from the same cache into its own run folder, then evaluated clean
and under the robustness conditions asked for. A finished run (its metrics.json and robustness
rows on disk) is never redone, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.validate import NON_NEGATIVE, NON_NEGATIVE_INT, Range, check_numbers

ABLATIONS = ("cross-attn", "cca", "M", "fusion", "fbp")


@dataclass
class SweepConfig:
    cache: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: ["molt", "baseline"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "runs/sweep"
    noise: list[float] = field(default_factory=list)  # robustness noise levels (feature level)
    missing: list[str] = field(default_factory=list)  # "text", "image"
    strategy: str = "zero"
    reg_weight: float = 0.1  # weight of a `reg:NAME` variant's regularizer
    train: dict = field(default_factory=dict)  # TrainConfig overrides (epochs, batch_size, ...)
    heads: dict = field(default_factory=dict)  # HeadsConfig overrides (d_common, ...)

    NUMERIC: ClassVar[dict[str, Range]] = {"seeds": NON_NEGATIVE_INT, "noise": NON_NEGATIVE,
                                           "reg_weight": NON_NEGATIVE}

    def validate(self) -> None:
        """Every number of the sweep and of the train/heads overrides, before any run."""
        check_numbers(self)
        check_numbers(self.train, {k: r for k, r in TrainConfig.NUMERIC.items() if k in self.train})
        check_numbers(self.heads, {k: r for k, r in HeadsConfig.NUMERIC.items() if k in self.heads})


def variant_configs(variant: str, cfg: SweepConfig) -> tuple[HeadsConfig, dict[str, float]]:
    """'molt' | 'baseline' | 'text-only' | 'image-only' | 'ablate:<part>[+<part>]' | 'reg:<name>[+<name>]'
    -> heads config, reg weights."""
    kind, _, arg = variant.partition(":")
    heads = HeadsConfig(**cfg.heads)
    if kind in ("molt", "baseline", "text-only", "image-only") and not arg:
        heads.model = kind
        return heads, {}
    if kind == "ablate" and arg:
        parts = arg.split("+")
        bad = [p for p in parts if p not in ABLATIONS]
        if bad:
            raise ValueError(f"variant {variant!r}: unknown ablation {bad}; valid: {list(ABLATIONS)}")
        heads.ablate = parts
        return heads, {}
    if kind == "reg" and arg:
        from molt_cache.losses.structure import REGULARIZERS

        names = arg.split("+")
        bad = [n for n in names if n not in REGULARIZERS]
        if bad:
            raise ValueError(f"variant {variant!r}: unknown regularizer {bad}; valid: {list(REGULARIZERS)}")
        return heads, {n: cfg.reg_weight for n in names}
    raise ValueError(f"unknown variant {variant!r}; valid: molt, baseline, text-only, image-only, ablate:<{'|'.join(ABLATIONS)}>, "
                     "reg:<separation|bridge|geometric>")


def _run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant.replace(":", "_").replace("+", "_") / f"seed{seed}"


def run_sweep(cfg: SweepConfig, *, log: Callable[[str], None] = print,
              on_epoch: Callable[[str, int, dict], None] | None = None,
              on_step: Callable[[str, int, int, int, int, float], None] | None = None) -> list[dict]:
    """Train and evaluate every variant × seed; returns per-run rows (variant, seed, condition, metrics).

    log(line): the plan before any work (runs to train, epochs at most, and after the first epoch
    an estimate of the total time), each run's start and end. on_epoch(variant, seed, record)
    after every epoch of every run (train_heads' log.jsonl record); without it, one log line.
    on_step(variant, seed, epoch, step, steps, loss) after every optimizer step (progress bars)."""
    from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness
    from molt_cache.train import train_heads

    cfg.validate()
    plans = [(v, *variant_configs(v, cfg)) for v in cfg.variants]  # validate all before any work
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    epochs = int(cfg.train.get("epochs", TrainConfig.epochs))
    to_train = [(v, s) for v, _, _ in plans for s in cfg.seeds
                if not (_run_dir(out, v, s) / "metrics.json").exists()]
    total_runs = len(plans) * len(cfg.seeds)
    log(f"sweep: {total_runs} runs ({len(cfg.variants)} variants × {len(cfg.seeds)} seeds), "
        f"{total_runs - len(to_train)} trained earlier; {len(to_train)} to train × up to {epochs} epochs = "
        f"up to {len(to_train) * epochs} epochs (early stopping ends runs sooner)")
    clock = {"t0": time.perf_counter(), "epochs": 0, "estimated": False}

    def epoch_done(variant: str, seed: int, record: dict) -> None:
        clock["epochs"] += 1
        if on_epoch:
            on_epoch(variant, seed, record)
        else:
            vals = "  ".join(f"{k}={100 * v:.2f}" for k, v in record.items() if k.startswith("val_"))
            log(f"{variant} seed {seed} epoch {record['epoch'] + 1}/{epochs}  "
                f"loss {record.get('train_loss', float('nan')):.4f}  {vals}")
        if not clock["estimated"]:
            clock["estimated"] = True
            per_epoch = (time.perf_counter() - clock["t0"]) / clock["epochs"]
            log(f"sweep: first epoch took {per_epoch:.1f}s; the whole sweep takes at most about "
                f"{per_epoch * len(to_train) * epochs / 60:.1f} min of training")

    rows: list[dict] = []
    for variant, heads_cfg, reg in plans:
        for seed in cfg.seeds:
            run_dir = _run_dir(out, variant, seed)
            rows_path = run_dir / "robustness.json"
            if rows_path.exists():
                log(f"{variant} seed {seed}: done earlier, reusing")
                rows += json.loads(rows_path.read_text())
                continue
            if not (run_dir / "metrics.json").exists():
                if run_dir.exists():  # the sweep's own interrupted training: redone from scratch, said aloud
                    log(f"{variant} seed {seed}: removing unfinished run {run_dir} (no metrics.json)")
                    shutil.rmtree(run_dir)
                log(f"{variant} seed {seed}: training ({to_train.index((variant, seed)) + 1} of {len(to_train)})")
                train_cfg = TrainConfig(**{**cfg.train, "cache": cfg.cache, "run_dir": str(run_dir), "seed": seed,
                                           "reg": reg})
                res = train_heads(train_cfg, HeadsConfig(**asdict(heads_cfg)),
                                  on_epoch=lambda r, v=variant, s=seed: epoch_done(v, s, r),
                                  on_step=(lambda e, i, n, loss, v=variant, s=seed: on_step(v, s, e, i, n, loss))
                                  if on_step else None)
                log(f"{variant} seed {seed}: best epoch {res.best_epoch + 1} of {res.epochs_run}, "
                    f"{res.seconds:.1f}s; {time.perf_counter() - clock['t0']:.0f}s into the sweep")
            rob = run_robustness(RobustnessConfig(runs=[str(run_dir)], noise=cfg.noise, missing=cfg.missing,
                                                  levels=["feature"], strategy=cfg.strategy, seed=seed,
                                                  device=cfg.train.get("device", "auto"),
                                                  in_memory=cfg.train.get("in_memory", False),
                                                  report_dir=str(run_dir)), log=lambda s: None)
            mine = [{"variant": variant, "seed": seed, **r} for r in rob]
            rows_path.write_text(json.dumps(mine, indent=2) + "\n")
            rows += mine
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per variant × condition (std with ddof=1; 0 for a single seed)."""
    from molt_cache.robustness.report import metric_keys

    keys = metric_keys(rows)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["condition"]), []).append(r)
    out = []
    for (variant, condition), rs in groups.items():
        entry = {"variant": variant, "condition": condition, "seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            entry[f"{k}_mean"], entry[f"{k}_std"] = mean, std
        out.append(entry)
    return out


def paired_differences(rows: list[dict], a: str = "molt", b: str = "baseline",
                       metric: str = "accuracy") -> list[dict]:
    """Per condition, the seed-paired difference a − b (same seed: same training order, same
    evaluation noise draw): mean, std (ddof=1; 0 for one seed), min, max over the seeds both
    variants have, and how many seeds a wins / ties / loses. Rows as `run_sweep` returns them."""
    by = {(r["variant"], r["condition"], r["seed"]): r[metric] for r in rows if metric in r}
    out = []
    for condition in dict.fromkeys(r["condition"] for r in rows):
        seeds = sorted({s for (v, c, s) in by if v == a and c == condition} &
                       {s for (v, c, s) in by if v == b and c == condition})
        if not seeds:
            continue
        d = [by[(a, condition, s)] - by[(b, condition, s)] for s in seeds]
        mean = sum(d) / len(d)
        std = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else 0.0
        out.append({"condition": condition, "a": a, "b": b, "metric": metric, "seeds": seeds,
                    "diff_mean": mean, "diff_std": std, "diff_min": min(d), "diff_max": max(d),
                    "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d)})
    return out


def write_sweep_report(summary: list[dict], rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    import csv

    out = Path(out_dir)
    paths = {"json": out / "summary.json", "csv": out / "summary.csv", "rows": out / "runs.json",
             "plot": out / "summary.png"}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    variants = {r["variant"] for r in rows}
    if {"molt", "baseline"} <= variants:
        paths["paired"] = out / "paired_molt_vs_baseline.json"
        paths["paired"].write_text(json.dumps(paired_differences(rows), indent=2) + "\n")
    paths["rows"].write_text(json.dumps(rows, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    _plot(summary, paths["plot"])
    return paths


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(k[:-5] for k in summary[0] if k.endswith("_mean"))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    conditions = list(dict.fromkeys(s["condition"] for s in summary))
    width = 0.8 / max(len(conditions), 1)
    fig, ax = plt.subplots(figsize=(max(6, len(variants) * 1.1), 4))
    for j, cond in enumerate(conditions):
        ms = [next((s for s in summary if s["variant"] == v and s["condition"] == cond), None) for v in variants]
        xs = [i + j * width for i in range(len(variants))]
        ax.bar(xs, [100 * m[f"{metric}_mean"] if m else 0 for m in ms], width,
               yerr=[100 * m[f"{metric}_std"] if m else 0 for m in ms], label=cond, capsize=2)
    ax.set_xticks([i + width * (len(conditions) - 1) / 2 for i in range(len(variants))])
    ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%) mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
