"""`molt robustness`: score trained heads with a modality absent or noised (paper Table 3).

Feature level perturbs the cached states at load time (seeded per sample, so every model compared
sees the same noise). Input level perturbs pixels / token embeddings, which needs the frozen
encoders again: the perturbed split is extracted into its own cache, keyed by level, modality,
seed and encoders, and reused when it already exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from molt_cache.cache.reader import CacheSplit, open_cache
from molt_cache.cache.store import PLACEMENTS, FeatureStore, choose_placement, make_batches, open_store
from molt_cache.perturb import MissingTable, make_perturb
from molt_cache.train import check_run_matches_cache, check_run_trained, evaluate, load_run, resolve_device
from molt_cache.validate import COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, Range, check_numbers

LEVELS = ("feature", "input")
STRATEGIES = ("zero", "empty", "translate")


@dataclass
class RobustnessConfig:
    runs: list[str] = field(default_factory=list)
    noise: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2])
    missing: list[str] = field(default_factory=lambda: ["text", "image"])  # each a condition; [] for none
    levels: list[str] = field(default_factory=lambda: ["feature"])
    noise_on: str = "both"  # image | text | both
    strategy: str = "zero"  # zero | empty | translate
    missing_rate: float = 0.0  # missing-aware-prompting protocol: a fraction of pairs, not all
    missing_type: str = "both"
    seed: int = 0
    split: str = "test"
    batch_size: int = 256
    device: str = "auto"
    report_dir: str = "reports/robustness"
    input_cache_root: str = ""  # where input-level caches go; default: beside the run's cache
    cache: str = ""  # override the cache the runs were trained on
    store: str = "auto"  # where the evaluated split's features live, as in train-heads: auto | device | host | stream
    in_memory: bool = False  # alias of store="host"

    NUMERIC: ClassVar[dict[str, Range]] = {"noise": NON_NEGATIVE, "missing_rate": FRACTION,
                                           "seed": NON_NEGATIVE_INT, "batch_size": COUNT}

    def validate(self) -> None:
        check_numbers(self)
        for lvl in self.levels:
            if lvl not in LEVELS:
                raise ValueError(f"unknown --level {lvl!r}; valid: {list(LEVELS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown --strategy {self.strategy!r}; valid: {list(STRATEGIES)}")
        if self.strategy == "empty" and "input" not in self.levels:
            raise ValueError("--strategy empty runs an empty text / blank image through the encoders: add --level input")
        if self.noise_on not in ("image", "text", "both"):
            raise ValueError(f"unknown --noise-on {self.noise_on!r}; valid: image, text, both")
        for m in self.missing:
            if m not in ("text", "image"):
                raise ValueError(f"unknown --missing {m!r}; valid: text, image, none")
        if not 0.0 <= self.missing_rate <= 1.0:
            raise ValueError(f"--missing-rate must be in [0, 1], got {self.missing_rate}")
        if self.missing_type not in ("text", "image", "both"):
            raise ValueError(f"unknown --missing-type {self.missing_type!r}; valid: text, image, both")
        if any(p < 0 for p in self.noise):
            raise ValueError(f"noise levels must be >= 0, got {self.noise}")
        if self.store not in PLACEMENTS:
            raise ValueError(f"unknown --store {self.store!r}; valid: {list(PLACEMENTS)}")
        if self.in_memory and self.store not in ("auto", "host"):
            raise ValueError(f"in_memory means --store host; it contradicts --store {self.store}")
        if not self.runs:
            raise ValueError("no run given: pass --run RUN_DIR (made by `molt train-heads`)")


@dataclass(frozen=True)
class Condition:
    """One row of the table: what is done to the test split."""

    name: str
    level: str  # "clean" | "feature" | "input"
    missing: str | None = None  # "text" | "image"
    noise: float = 0.0
    noise_on: str = "both"


def conditions(cfg: RobustnessConfig) -> list[Condition]:
    out = [Condition("clean", "clean")]
    for level in cfg.levels:
        for m in cfg.missing:
            # input-level absence is only meaningful as an empty input through the encoder
            if level == "input" and cfg.strategy != "empty":
                continue
            if level == "feature" and cfg.strategy == "empty":
                continue
            rate = f" {cfg.missing_rate:.0%}" if cfg.missing_rate else ""
            out.append(Condition(f"{m} absent{rate} ({level}, {cfg.strategy})", level, missing=m))
        if level == "feature" and cfg.missing_rate and cfg.missing_type == "both" and cfg.strategy != "empty":
            # missing-aware prompting's mixed protocol: of the missing pairs, half lack text, half the image
            out.append(Condition(f"missing {cfg.missing_rate:.0%}, half text half image ({level}, {cfg.strategy})",
                                 level, missing="both"))
        for p in cfg.noise:
            if p > 0:
                out.append(Condition(f"noise {p:.0%} on {cfg.noise_on} ({level})", level, noise=p, noise_on=cfg.noise_on))
    return out


def input_cache_key(manifest: dict, cond: Condition, seed: int, split: str) -> str:
    """Perturbed caches are keyed by what makes them: level, modality, amount, seed, encoders, data."""
    ident = {
        "split": split, "seed": seed, "missing": cond.missing, "noise": cond.noise, "noise_on": cond.noise_on,
        "text": manifest["text"].get("weights_sha256"), "image": manifest["image"].get("weights_sha256"),
        "dataset": manifest["dataset"].get("fingerprint"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def input_level_cache(base_cache: Path, manifest: dict, cond: Condition, cfg: RobustnessConfig,
                      log: Callable[[str], None], extract_callbacks: dict | None = None) -> Path:
    """Build (or reuse) the perturbed split's cache through stage one (extract()'s on_phase /
    on_items in `extract_callbacks`)."""
    from molt_cache.extract import extract, extract_config_from_manifest

    root = Path(cfg.input_cache_root) if cfg.input_cache_root else base_cache.parent / f"{base_cache.name}.perturbed"
    tag = f"empty-{cond.missing}" if cond.missing else f"noise{cond.noise:g}-{cond.noise_on}"
    out = root / f"{tag}-seed{cfg.seed}-{input_cache_key(manifest, cond, cfg.seed, cfg.split)}"
    if (out / "manifest.json").exists():
        log(f"reusing input-level cache {out}")
        return out
    log(f"extracting input-level cache {out} ({cond.name})")
    ecfg = extract_config_from_manifest(manifest, out_dir=str(out), splits=[cfg.split], seed=cfg.seed,
                                        noise=cond.noise, noise_on=cond.noise_on, empty=cond.missing)
    extract(ecfg, on_log=log, **(extract_callbacks or {}))
    return out


class SplitStores:
    """The evaluated splits' feature stores, with the placement train-heads would choose (printed
    once per split). A split evaluated under feature-level conditions (`keep`) is loaded once and
    shared by every run and condition; an input-level split (its own perturbed cache) is held only
    until the next one comes, so memory holds at most two splits. `stream` (or a split that fits
    nowhere) reads from disk per batch. Every split is refused if it holds inf/NaN (an older or
    altered cache) when first loaded: the store checks each block as it reads it, a streamed split
    is read through once (`open_store`)."""

    def __init__(self, store: str, device, log: Callable[[str], None]):
        self.store, self.device, self.log = store, device, log
        self.kept: dict[tuple[str, str], FeatureStore | None] = {}
        self.last: tuple[tuple[str, str], FeatureStore | None] | None = None

    def _store(self, split: CacheSplit, keep: bool) -> FeatureStore | None:
        key = (str(split.reader.path), split.name)
        if key in self.kept:
            return self.kept[key]
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        self.last = None  # free the previous input-level split before loading another
        placement, line = choose_placement([split], self.store, self.device)
        self.log(f"{split.reader.path} split {split.name!r}: {line}")
        store = open_store([split], placement, self.device, check_finite=True)
        if keep:
            self.kept[key] = store
        else:
            self.last = (key, store)
        return store

    def batches(self, split: CacheSplit, *, keep: bool, batch_size: int, seed: int, perturb):
        return make_batches([split], store=self._store(split, keep), batch_size=batch_size, shuffle=False,
                            seed=seed, epoch=0, perturb=perturb, pin_memory=self.device.type == "cuda")


def run_robustness(cfg: RobustnessConfig, *, log: Callable[[str], None] = print,
                   extract_callbacks: dict | None = None) -> list[dict]:
    """Evaluate every run under every condition. Returns rows: {model, run, condition, level, ...metrics}.
    `extract_callbacks` (extract()'s on_phase / on_items) follow input-level extractions."""
    cfg.validate()
    device = resolve_device(cfg.device)
    stores = SplitStores("host" if cfg.in_memory else cfg.store, device, log)
    rows = []
    conds = conditions(cfg)
    for run in cfg.runs:  # every run refused before any work if one finished no training epoch
        check_run_trained(run)
    for run in cfg.runs:
        heads, heads_cfg, train_cfg, config = load_run(run, device, require_trained=False)  # checked above
        cache_path = Path(cfg.cache or train_cfg.cache[0])
        reader = open_cache(cache_path)
        check_run_matches_cache(config, reader)
        label = f"{heads_cfg.model}" + (f" -{'-'.join(heads_cfg.ablate)}" if heads_cfg.ablate else "")
        for cond in conds:
            split = reader.split(cfg.split)
            perturb = None
            if cond.level == "input":
                split = open_cache(input_level_cache(cache_path, reader.manifest, cond, cfg, log,
                                                         extract_callbacks)).split(cfg.split)
            elif cond.level == "feature":
                table = None
                if cond.missing:
                    rate = cfg.missing_rate or 1.0
                    table = MissingTable.sample(split.num_pairs, rate, cond.missing, cfg.seed)
                perturb = make_perturb(noise=cond.noise, noise_on=cond.noise_on, missing_table=table,
                                       strategy=cfg.strategy, seed=cfg.seed)
            loader = stores.batches(split, keep=cond.level != "input", batch_size=cfg.batch_size, seed=cfg.seed,
                                    perturb=perturb)
            # translate needs the heads to know which modality is absent; zero/empty feed what is there
            strategy = cfg.strategy if cond.missing and cond.level == "feature" else "zero"
            metrics = evaluate(heads, loader, device, heads_cfg.multi_label, missing_strategy=strategy)
            rows.append({"model": label, "run": str(run), "condition": cond.name, "level": cond.level,
                         "split": cfg.split, "pairs": split.num_pairs, "seed": cfg.seed,
                         "missing": cond.missing, "noise": cond.noise, "noise_on": cond.noise_on, **metrics})
            log(f"{label:>10}  {cond.name:<36} " + "  ".join(f"{k}={100 * v:.2f}" for k, v in metrics.items()))
    return rows
