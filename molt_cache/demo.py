"""`molt demo`: the whole pipeline on a bundled sample, offline, in minutes on 2 CPU cores.

The default sample is real: 554 OpenClipart drawings with their artists' words, 14 classes
(`openclipart-sample`, data/openclipart_sample/README.md); `dataset="sample"` is the synthetic one.
sample → extract (shipped SmolLM2-135M + EfficientNet-Lite0, or `--tiny` random encoders) →
train-heads (MoLT and baseline) → robustness (text absent, image absent, noise 1/5/10/20 % at
feature and input level) → one summary table and the report folder.
Every stage reuses what a previous run of the demo already made.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.validate import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, Range, check_numbers


@dataclass
class DemoConfig:
    out_dir: str = "molt-out/demo"
    dataset: str = "openclipart-sample"  # or "sample" (synthetic, for tests)
    tiny: bool = False  # random tiny encoders instead of the shipped pretrained ones
    d_common: int = 128  # d_c: the paper's 1024 is sized for LLaMA-7B; a 14-class sample needs far less
    epochs: int = 30
    patience: int = 8
    batch_size: int = 32
    lr: float = 4e-4
    seed: int = 0
    noise: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2])
    levels: list[str] = field(default_factory=lambda: ["feature", "input"])
    device: str = "auto"

    NUMERIC: ClassVar[dict[str, Range]] = {
        "d_common": COUNT, "epochs": COUNT, "patience": COUNT, "batch_size": Range(lo=2, integer=True),
        "lr": POSITIVE, "seed": NON_NEGATIVE_INT, "noise": NON_NEGATIVE}

    def validate(self) -> None:
        check_numbers(self)

    @property
    def text_spec(self) -> str:
        return "tiny:llama" if self.tiny else "shipped:smollm2"

    @property
    def image_spec(self) -> str:
        return "tiny:vit" if self.tiny else "shipped:efficientnet-lite0"


@dataclass
class DemoResult:
    cache: Path
    runs: dict[str, Path]
    report_dir: Path
    rows: list[dict]
    seconds: dict[str, float]
    report_files: dict[str, Path] = field(default_factory=dict)  # results.json/csv, config.json, PNGs


def demo_layout(cfg: DemoConfig) -> dict[str, Path]:
    """Where the demo writes: its cache, the MoLT and baseline runs, the report folder. The
    commands' --help examples point here (tests/test_help_examples.py keeps them in step)."""
    out = Path(cfg.out_dir) / cfg.dataset / ("tiny" if cfg.tiny else "shipped")
    return {"cache": out / "cache", "molt": out / "runs" / "molt", "baseline": out / "runs" / "baseline",
            "report": out / "report"}


def run_demo(cfg: DemoConfig, *, log: Callable[[str], None] = print,
             extract_callbacks: dict | None = None) -> DemoResult:
    """The whole demo; `log` gets one line per step, `extract_callbacks` (extract()'s on_phase /
    on_items, e.g. the CLI's bars) every extraction's progress, the input-level ones included."""
    from molt_cache.extract import ExtractConfig, extract
    from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness
    from molt_cache.robustness.report import write_report
    from molt_cache.train import train_heads

    from molt_cache.datasets import BUNDLED

    cfg.validate()
    if cfg.dataset not in BUNDLED:
        raise ValueError(f"the demo runs on a bundled sample: {list(BUNDLED)}, not {cfg.dataset!r} "
                         f"(for a release on disk use molt extract / train-heads / robustness)")
    layout = demo_layout(cfg)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    cache = layout["cache"]
    extract(ExtractConfig(dataset=cfg.dataset, root=None, text=cfg.text_spec, image=cfg.image_spec,
                          out_dir=str(cache), device=cfg.device, seed=cfg.seed),
            on_log=log, **(extract_callbacks or {}))
    seconds["extract"] = time.perf_counter() - t

    runs = {}
    for model in ("molt", "baseline"):
        t = time.perf_counter()
        run_dir = layout[model]
        heads_cfg = HeadsConfig(model=model, d_common=cfg.d_common)
        train_cfg = TrainConfig(cache=[str(cache)], run_dir=str(run_dir), epochs=cfg.epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, seed=cfg.seed, device=cfg.device, patience=cfg.patience)
        if (run_dir / "metrics.json").exists() and _same_run_config(run_dir, heads_cfg, train_cfg):
            log(f"reusing trained {model} heads in {run_dir}")
        else:
            if run_dir.exists():
                _retire(run_dir, log)
            log(f"training {model} heads (d_c={cfg.d_common}, up to {cfg.epochs} epochs)")
            res = train_heads(train_cfg, heads_cfg, on_epoch=lambda r, m=model: log(
                f"  {m} epoch {r['epoch']:2d}  loss {r.get('train_loss', float('nan')):.4f}  "
                + "  ".join(f"{k}={100 * v:.1f}" for k, v in r.items() if k.startswith("val_"))))
            log(f"  {model}: best epoch {res.best_epoch}, test {json.dumps({k: round(100 * v, 2) for k, v in res.test.items()})}")
        runs[model] = run_dir
        seconds[f"train {model}"] = time.perf_counter() - t

    t = time.perf_counter()
    report_dir = layout["report"]
    base = dict(runs=[str(runs["molt"]), str(runs["baseline"])], seed=cfg.seed, device=cfg.device,
                report_dir=str(report_dir))
    rows = run_robustness(RobustnessConfig(noise=cfg.noise, levels=cfg.levels, strategy="zero", **base), log=log,
                          extract_callbacks=extract_callbacks)
    # translate: the present modality's common-space states stand in for the absent one (MoLT only)
    translate = run_robustness(RobustnessConfig(noise=[], levels=["feature"], strategy="translate",
                                                runs=[str(runs["molt"])], seed=cfg.seed, device=cfg.device,
                                                report_dir=str(report_dir)), log=log)
    rows += [r for r in translate if r["condition"] != "clean"]
    if "input" in cfg.levels:
        empty = run_robustness(RobustnessConfig(noise=[], levels=["input"], strategy="empty", **base), log=log,
                               extract_callbacks=extract_callbacks)
        rows += [r for r in empty if r["condition"] != "clean"]
    seconds["robustness"] = time.perf_counter() - t
    # the demo's own folder, rewritten from the same runs on every rerun (same seed: same numbers)
    files = write_report(rows, report_dir, {"demo": asdict(cfg), "seconds": seconds}, overwrite=True)
    return DemoResult(cache, runs, report_dir, rows, seconds, files)


def _same_run_config(run_dir: Path, heads_cfg: HeadsConfig, train_cfg: TrainConfig) -> bool:
    saved = json.loads((run_dir / "config.json").read_text())
    ours_train = asdict(train_cfg)
    ours_heads = asdict(heads_cfg)
    # the trainer fills these from the cache
    ours_heads.update({k: saved["heads"][k] for k in ("num_classes", "multi_label")})
    return saved["train"] == ours_train and saved["heads"] == ours_heads


def _retire(run_dir: Path, log: Callable[[str], None]) -> None:
    """A demo run made with other settings is moved aside, never deleted."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old{n}")).exists():
        n += 1
    run_dir.rename(aside)
    log(f"settings changed: previous run moved to {aside}")
