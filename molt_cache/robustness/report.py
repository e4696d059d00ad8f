"""Robustness results as the paper's Table 3: rich table, JSON, CSV and PNG plots in one folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.table import Table

METRIC_NAMES = ("accuracy", "f1_micro", "f1_macro")


def metric_keys(rows: list[dict]) -> list[str]:
    return [k for k in METRIC_NAMES if rows and k in rows[0]]


def robustness_table(rows: list[dict], title: str = "Robustness") -> Table:
    """Rows: model × condition, the clean row of each model first; metrics in percent."""
    keys = metric_keys(rows)
    table = Table(title=title)
    table.add_column("model")
    table.add_column("condition")
    for k in keys:
        table.add_column(k, justify="right")
    for r in sorted(rows, key=lambda r: (r["model"], r["condition"] != "clean")):
        table.add_row(r["model"], r["condition"], *(f"{100 * r[k]:.2f}" for k in keys))
    return table


UNIMODAL = {"text": "image-only", "image": "text-only"}  # absent modality -> the reference that lacks it


def ceiling_rows(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """Each fused model's score with a modality absent beside the unimodal reference that never
    had it (its clean score): `gap` = fused - ceiling in points of `metric` (negative: the fused
    model loses more than reading the remaining modality alone would). Empty without
    text-only / image-only runs among `rows`."""
    ceilings = {r["model"]: r[metric] for r in rows if r["model"] in UNIMODAL.values() and r["condition"] == "clean"}
    out = []
    for r in rows:
        ref = UNIMODAL.get(r.get("missing") or "")
        if ref in ceilings and r["model"] not in UNIMODAL.values() and metric in r:
            out.append({"model": r["model"], "condition": r["condition"], "reference": ref,
                        metric: r[metric], "ceiling": ceilings[ref], "gap": r[metric] - ceilings[ref]})
    return out


def ceiling_table(rows: list[dict], metric: str = "accuracy") -> Table | None:
    """`ceiling_rows` as a rich table (percent), or None when there is no unimodal reference."""
    found = ceiling_rows(rows, metric)
    if not found:
        return None
    table = Table(title=f"Modality absent vs the unimodal ceiling ({metric}, %)")
    for col in ("model", "condition", "reference", metric, "ceiling", "gap (points)"):
        table.add_column(col, justify="left" if col in ("model", "condition", "reference") else "right")
    for r in found:
        table.add_row(r["model"], r["condition"], r["reference"], f"{100 * r[metric]:.2f}",
                      f"{100 * r['ceiling']:.2f}", f"{100 * r['gap']:+.2f}")
    return table


def write_report(rows: list[dict], report_dir: str | Path, config: dict) -> dict[str, Path]:
    """Write results.json, results.csv, config.json and one PNG per metric; return their paths."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "config": out / "config.json"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    paths["config"].write_text(json.dumps(config, indent=2, default=str) + "\n")
    if rows:
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if ceiling_rows(rows):
        paths["ceilings"] = out / "ceilings.json"
        paths["ceilings"].write_text(json.dumps(ceiling_rows(rows), indent=2) + "\n")
    for k in metric_keys(rows):
        paths[f"plot_{k}"] = plot_noise_curves(rows, k, out / f"noise_{k}.png")
    return paths


def plot_noise_curves(rows: list[dict], metric: str, path: Path) -> Path:
    """Left: metric vs noise level, one line per model × level, the clean score at noise 0.
    Right: the missing-modality conditions as grouped bars, one group per condition."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; PNG only
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    levels = sorted({r["level"] for r in rows if r["level"] != "clean" and r["noise"] > 0})
    missing = [r for r in rows if r["missing"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    colors = {m: f"C{i}" for i, m in enumerate(models)}  # one color per model in both panels
    for model in models:
        clean = [r for r in rows if r["model"] == model and r["level"] == "clean"]
        for level in levels:
            pts = sorted((r["noise"], r[metric]) for r in rows
                         if r["model"] == model and r["level"] == level and r["noise"] > 0)
            if clean:
                pts = [(0.0, clean[0][metric])] + pts
            if len(pts) > 1:
                xs, ys = zip(*pts)
                ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o", color=colors[model],
                        linestyle="-" if level == "feature" else "--", label=f"{model} ({level})")
    ax.set_xlabel("Gaussian noise p (% of per-sample std)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("noise")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no noise levels asked: an empty panel, no legend
        ax.legend(fontsize=7)

    conditions = list(dict.fromkeys(["clean"] + [r["condition"] for r in missing]))
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        values = [next((100 * r[metric] for r in rows if r["model"] == model and r["condition"] == c), 0.0)
                  for c in conditions]
        bx.bar([i + j * width for i in range(len(conditions))], values, width, label=model, color=colors[model])
    bx.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(conditions))])
    bx.set_xticklabels([c.replace(" (", "\n(").replace(", ", ",\n") for c in conditions], fontsize=7)
    bx.set_ylabel(f"{metric} (%)")
    bx.set_title("missing modality")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
