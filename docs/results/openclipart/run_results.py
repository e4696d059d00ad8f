"""The full-OpenClipart results of docs/results.md, end to end, resumable (rerun to continue).

    python docs/results/openclipart/run_results.py CACHE OUT [--stage main|mr|translate|input|ablate|summary ...]

CACHE: made by `molt extract --dataset openclipart --root ROOT --on-bad skip --out-dir CACHE`
(shipped SmolLM2-135M + EfficientNet-Lite0). OUT: run folders, reports, summary.

Stages (each resumes: a finished run or report is reused; `seedwise` = main and mr, seed by seed):
  main       molt, baseline, text-only, image-only × seeds, trained on complete pairs; feature-level
             Table 3 (text / image absent zero-filled; noise 1/5/10/20 % on both) via `molt sweep`
  mr         molt, baseline trained with --missing-rate 0.5 --missing-type both (missing-aware
             prompting's protocol), same evaluation
  translate  every molt/baseline run: text / image absent with the 'translate' strategy
  input      every molt/baseline run: input-level noise (on normalized pixels and token embeddings,
             re-extracted once, noise seed 0, so every run sees the same perturbed inputs) and
             empty text / blank image through the encoders
  ablate     Table 2: ablate:cross-attn, cca, M, fusion, fbp × seeds, feature-level evaluation
  summary    mean ± std over seeds per variant × condition, seed-paired MoLT − baseline, plot
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SEEDS = [0, 1, 2]
# Sized to finish on 2 CPU cores shared with five other jobs (~0.3 core for this one): a MoLT
# epoch over the 4,324 training pairs at d_c 128 took 340 s of wall time there; d_c 64 halves the
# projections, 4 epochs at lr 1e-3 replace 20 at 4e-4. docs/results.md says what this costs.
TRAIN = {"epochs": 4, "patience": 4, "batch_size": 64, "lr": 1e-3, "device": "cpu", "in_memory": True}
HEADS = {"d_common": 64}
FEATURE_NOISE = [0.01, 0.05, 0.1, 0.2]
INPUT_NOISE = [0.01, 0.05, 0.1, 0.2]
ABLATIONS = ["ablate:cross-attn", "ablate:cca", "ablate:M", "ablate:fusion", "ablate:fbp"]


def share_open_caches() -> None:
    """One CacheReader per cache folder for this whole process: its splits memoize their
    in-memory arrays, so the 2 GB training split is decompressed once, not once per run.
    (Perturbations copy before they change anything, so runs cannot leak into each other.)"""
    import functools

    import molt_cache.robustness.evaluate as evaluate
    import molt_cache.train as train
    from molt_cache.cache import reader

    shared = functools.lru_cache(maxsize=None)(reader.open_cache)
    train.open_cache = evaluate.open_cache = lambda path: shared(str(Path(path).resolve()))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def sweep(cache: str, out: Path, variants: list[str], seeds: list[int] | None = None, **train) -> None:
    from molt_cache.sweep import SweepConfig, run_sweep, summarize, write_sweep_report

    cfg = SweepConfig(cache=[cache], variants=variants, seeds=seeds or SEEDS, out_dir=str(out), noise=FEATURE_NOISE,
                      missing=["text", "image"], strategy="zero", train={**TRAIN, **train}, heads=HEADS)
    rows = run_sweep(cfg, log=log)
    write_sweep_report(summarize(rows), rows, out)


def fused_runs(out: Path) -> list[tuple[str, Path]]:
    """(variant label, run folder) of every finished molt / baseline run, trained both ways."""
    found = []
    for group, suffix in (("main", ""), ("mr", " +MR")):
        for model in ("molt", "baseline"):
            for seed in SEEDS:
                run = out / group / model / f"seed{seed}"
                if (run / "metrics.json").exists():
                    found.append((model + suffix, run))
    return found


def robustness_once(run: Path, name: str, **kw) -> list[dict]:
    """One robustness evaluation of one run, cached as RUN/<name>.json."""
    from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness

    path = run / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    t = time.perf_counter()
    rows = run_robustness(RobustnessConfig(runs=[str(run)], device="cpu", report_dir=str(run / name),
                                           in_memory=True, **kw), log=log)
    rows = [r for r in rows if r["condition"] != "clean"]
    path.write_text(json.dumps(rows, indent=2) + "\n")
    log(f"{run} {name}: {time.perf_counter() - t:.0f} s")
    return rows


def stage_translate(out: Path) -> None:
    for _, run in fused_runs(out):
        seed = int(run.name.removeprefix("seed"))
        robustness_once(run, "translate", noise=[], missing=["text", "image"], levels=["feature"],
                        strategy="translate", seed=seed)


def stage_input(out: Path, cache: str) -> None:
    root = str(Path(out) / "input-caches")
    for _, run in fused_runs(out):
        robustness_once(run, "input", noise=INPUT_NOISE, missing=["text", "image"], levels=["input"],
                        strategy="empty", seed=0, input_cache_root=root)


def collect(out: Path) -> list[dict]:
    """Every (variant, seed, condition) row: the sweeps' runs.json, then translate / input rows."""
    rows = []
    for group, suffix in (("main", ""), ("mr", " +MR")):
        for path in sorted((out / group).glob("*/seed*/robustness.json")):  # each finished run's sweep rows
            rows += [{**r, "variant": r["variant"] + suffix} for r in json.loads(path.read_text())]
    for variant, run in fused_runs(out):
        seed = int(run.name.removeprefix("seed"))
        for name in ("translate", "input"):
            path = run / f"{name}.json"
            if path.exists():
                rows += [{**r, "variant": variant, "seed": seed} for r in json.loads(path.read_text())]
    return rows


def stage_summary(out: Path) -> None:
    from molt_cache.sweep import paired_differences, summarize

    rows = collect(out)
    summary = summarize(rows)
    paired = paired_differences(rows) + paired_differences(rows, "molt +MR", "baseline +MR") \
        + paired_differences(rows, "molt +MR", "molt") + paired_differences(rows, "baseline +MR", "baseline") \
        + [p for a in ABLATIONS for p in paired_differences(rows, a, "molt")
           if p["condition"] in ("clean", "text absent (feature, zero)", "image absent (feature, zero)")]
    (out / "all_rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "paired.json").write_text(json.dumps(paired, indent=2) + "\n")
    times = {}
    for group in ("main", "mr"):
        for run in sorted((out / group).glob("*/seed*")):
            m = run / "metrics.json"
            if m.exists():
                times[f"{group}/{run.parent.name}/{run.name}"] = json.loads(m.read_text()).get("seconds")
    (out / "train_seconds.json").write_text(json.dumps(times, indent=2) + "\n")
    (out / "tables.md").write_text(markdown(summary, paired) + "\n")
    print(markdown(summary, paired))
    plot(summary, out / "openclipart_accuracy.png")


TABLE2_CONDITIONS = ["clean", "text absent (feature, zero)", "image absent (feature, zero)",
                     "noise 20% on both (feature)"]


def markdown(summary: list[dict], paired: list[dict]) -> str:
    """Table 3 (every non-ablated variant × every condition, accuracy then macro F1), Table 2
    (MoLT and each ablation on a few conditions) and the seed-paired comparisons."""
    everything = list(dict.fromkeys(s["variant"] for s in summary))
    variants = [v for v in everything if not v.startswith("ablate:")]
    ablated = [v for v in everything if v.startswith("ablate:")]
    conditions = list(dict.fromkeys(s["condition"] for s in summary))
    cell = {(s["variant"], s["condition"]): s for s in summary}
    lines = ["| condition | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for c in conditions:
        vals = [f"{100 * cell[(v, c)]['accuracy_mean']:.2f} ± {100 * cell[(v, c)]['accuracy_std']:.2f}"
                if (v, c) in cell else "" for v in variants]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    if any("f1_macro_mean" in s for s in summary):
        lines += ["", "Macro F1 (%), mean ± std over seeds:", "",
                  "| condition | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for c in conditions:
            vals = [f"{100 * cell[(v, c)]['f1_macro_mean']:.2f} ± {100 * cell[(v, c)]['f1_macro_std']:.2f}"
                    if (v, c) in cell and "f1_macro_mean" in cell[(v, c)] else "" for v in variants]
            lines.append(f"| {c} | " + " | ".join(vals) + " |")
    if ablated:
        lines += ["", "Table 2, ablations: accuracy / macro F1 (%), mean ± std over seeds:", "",
                  "| variant | " + " | ".join(TABLE2_CONDITIONS) + " |", "|---" * (len(TABLE2_CONDITIONS) + 1) + "|"]
        for v in ["molt", *ablated]:
            vals = [f"{100 * cell[(v, c)]['accuracy_mean']:.2f} ± {100 * cell[(v, c)]['accuracy_std']:.2f} / "
                    f"{100 * cell[(v, c)].get('f1_macro_mean', float('nan')):.2f}" if (v, c) in cell else ""
                    for c in TABLE2_CONDITIONS]
            n = cell[(v, "clean")]["seeds"] if (v, "clean") in cell else 0
            lines.append(f"| {v} ({n} seeds) | " + " | ".join(vals) + " |")
    lines += ["", "| comparison | condition | difference (points) | min … max | w/t/l |", "|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['a']} − {p['b']} | {p['condition']} | {100 * p['diff_mean']:+.2f} ± "
                     f"{100 * p['diff_std']:.2f} | {100 * p['diff_min']:+.2f} … {100 * p['diff_max']:+.2f} | "
                     f"{p['wins']}/{p['ties']}/{p['losses']} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Like the paper's Figure 3 / Table 3: accuracy vs noise (feature and input level) and the
    missing-modality conditions, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(s["variant"], s["condition"]): s for s in summary}
    fused = [v for v in dict.fromkeys(s["variant"] for s in summary) if v.split()[0] in ("molt", "baseline")]
    colors = {v: f"C{i}" for i, v in enumerate(fused)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    for v in fused:
        for level, style, levels in (("feature", "-", FEATURE_NOISE), ("input", "--", INPUT_NOISE)):
            pts = [(0.0, cell.get((v, "clean")))] + [(p, cell.get((v, f"noise {p:.0%} on both ({level})"))) for p in levels]
            pts = [(p, s) for p, s in pts if s]
            if len(pts) > 1:
                ax.errorbar([100 * p for p, _ in pts], [100 * s["accuracy_mean"] for _, s in pts],
                            yerr=[100 * s["accuracy_std"] for _, s in pts], color=colors[v], linestyle=style,
                            marker="o", capsize=2, label=f"{v} ({level})")
    ax.set_xlabel("Gaussian noise p (% of per-sample std)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("noise on both modalities")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    conds = ["clean", "text absent (feature, zero)", "text absent (feature, translate)", "text absent (input, empty)",
             "image absent (feature, zero)", "image absent (feature, translate)", "image absent (input, empty)"]
    conds = [c for c in conds if any((v, c) in cell for v in fused)]  # conditions not run get no empty slot
    width = 0.8 / max(len(fused), 1)
    for j, v in enumerate(fused):
        ms = [cell.get((v, c)) for c in conds]
        bx.bar([i + j * width for i in range(len(conds))], [100 * m["accuracy_mean"] if m else 0 for m in ms], width,
               yerr=[100 * m["accuracy_std"] if m else 0 for m in ms], capsize=2, color=colors[v], label=v)
    for ref, style in (("text-only", ":"), ("image-only", "-.")):
        if (ref, "clean") in cell:
            bx.axhline(100 * cell[(ref, "clean")]["accuracy_mean"], color="k", linestyle=style, lw=1,
                       label=f"{ref} (clean): the ceiling without the other modality")
    bx.set_xticks([i + width * (len(fused) - 1) / 2 for i in range(len(conds))])
    bx.set_xticklabels([c.replace(" (", "\n(") for c in conds], fontsize=7)
    bx.set_title("missing modality")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("out")
    ap.add_argument("--stage", action="append", choices=["main", "mr", "seedwise", "translate", "input", "ablate", "summary"])
    args = ap.parse_args()
    out = Path(args.out)
    share_open_caches()
    for stage in args.stage or ["main", "mr", "translate", "input", "ablate", "summary"]:
        log(f"stage {stage}")
        if stage == "main":
            sweep(args.cache, out / "main", ["molt", "baseline", "text-only", "image-only"])
        elif stage == "mr":
            sweep(args.cache, out / "mr", ["molt", "baseline"], missing_rate=0.5, missing_type="both")
        elif stage == "seedwise":  # one seed at a time, so a cut-short session has whole seeds: main first
            for seed in SEEDS:
                sweep(args.cache, out / "main", ["molt", "baseline", "text-only", "image-only"], [seed])
            for seed in SEEDS:
                sweep(args.cache, out / "mr", ["molt", "baseline"], [seed], missing_rate=0.5, missing_type="both")
            sweep(args.cache, out / "main", ["molt", "baseline", "text-only", "image-only"])  # all reused
            sweep(args.cache, out / "mr", ["molt", "baseline"], missing_rate=0.5, missing_type="both")
        elif stage == "translate":
            stage_translate(out)
        elif stage == "input":
            stage_input(out, args.cache)
        elif stage == "ablate":
            # the main variants' finished runs are reused; listing them keeps main/runs.json whole
            sweep(args.cache, out / "main", ["molt", "baseline", "text-only", "image-only", *ABLATIONS])
        elif stage == "summary":
            stage_summary(out)
