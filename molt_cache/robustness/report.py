"""Robustness results as the paper's Table 3: rich table, JSON, CSV and PNG plots in one folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.table import Table

METRIC_NAMES = ("accuracy", "f1_micro", "f1_macro")


def metric_keys(rows: list[dict]) -> list[str]:
    return [k for k in METRIC_NAMES if rows and k in rows[0]]


STRATEGY_NOTES = {
    "zero": "zero = the absent modality's features are zeros",
    "translate": "translate = MoLT puts the present modality's common-space states in place of the absent one's "
                 "(the baseline has no common space: '—')",
    "empty": "empty = an empty text / a blank gray image run through the frozen encoder",
}
BLANK = "—"


def _describe(rows: list[dict]) -> str:
    """'96 test pairs, seed 0' from the rows (several values listed when they differ)."""
    def values(key):
        return sorted({r[key] for r in rows if r.get(key) is not None}, key=str)
    pairs, splits, seeds = values("pairs"), values("split"), values("seed")
    parts = []
    if pairs or splits:
        parts.append(f"{'/'.join(map(str, pairs)) or '?'} {'/'.join(splits) or ''} pairs".replace("  ", " "))
    if seeds:
        parts.append(f"seed {'/'.join(map(str, seeds))}")
    return ", ".join(parts)


def robustness_table(rows: list[dict], title: str = "Robustness", *,
                     ceilings: dict[str, float] | None = None) -> Table:
    """One row per condition (clean first), one column per model × metric, in percent; a cell is
    '—' where that model was not scored under that condition. The caption says what is behind
    each number (pairs, split, seed), what each strategy means and, when given, each modality's
    ceiling (`ceilings`: {"image alone": 0.5, ...}, fractions)."""
    keys = metric_keys(rows)
    models = list(dict.fromkeys(r["model"] for r in sorted(rows, key=lambda r: r["model"] != "molt")))
    conditions = list(dict.fromkeys(["clean"] + [r["condition"] for r in rows]))
    cell = {(r["model"], r["condition"]): r for r in rows}
    table = Table(title=title)
    table.add_column("condition")
    for m in models:
        for k in keys:
            table.add_column(f"{m}\n{k} %", justify="right")
    for c in conditions:
        table.add_row(c, *(f"{100 * cell[m, c][k]:.2f}" if (m, c) in cell else BLANK for m in models for k in keys))
    notes = [f"each number: one trained run per model, scored on {_describe(rows)}" if _describe(rows) else
             "each number: one trained run per model"]
    notes.append("feature level perturbs the cached states; input level re-runs the encoders on perturbed inputs")
    strategies = [s for s in STRATEGY_NOTES if any(f", {s})" in c for c in conditions)]
    notes += [STRATEGY_NOTES[s] for s in strategies]
    if any((m, c) not in cell for m in models for c in conditions):
        notes.append(f"{BLANK} = that model was not scored under that condition")
    if ceilings:
        notes.append("ceiling (a perfect reader): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in ceilings.items()))
    table.caption = "\n".join(notes)
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


def check_report_dir(report_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a folder that already holds a report (results.json) unless `overwrite`: a second
    `molt robustness` into the default folder would otherwise replace the first one's results.
    Call it before evaluating, so the refusal comes before minutes of work.
    Raises FileExistsError naming the folder and the two ways out."""
    results = Path(report_dir) / "results.json"
    if results.exists() and not overwrite:
        raise FileExistsError(f"{report_dir} already holds a robustness report ({results.name}); choose another "
                              "--report-dir, or pass --overwrite to replace it (its input-level caches are reused)")


def write_report(rows: list[dict], report_dir: str | Path, config: dict, *,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write results.json, results.csv, config.json and one PNG per metric; return their paths.
    An existing report in `report_dir` is replaced only with `overwrite` (`check_report_dir`)."""
    check_report_dir(report_dir, overwrite)
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
    """noise_figure(rows, metric) saved as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = noise_figure(rows, metric)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def noise_figure(rows: list[dict], metric: str):
    """Left: metric vs noise level, one line per model × level, the clean score at noise 0.
    Right: the missing-modality conditions as grouped bars, one group per condition. Both y axes
    start at 0; the title names the split, the number of pairs and the seed."""
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
    ax.set_ylim(bottom=0)  # from 0: a small drop must not look like a collapse
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
    bx.set_ylim(bottom=0)
    bx.legend(fontsize=7)
    described = _describe(rows)
    fig.suptitle(f"{metric}: {described}" if described else metric, fontsize=9)
    fig.tight_layout()
    return fig
