"""Configs: one dataclass per buildable thing. Printed at start, saved beside results as JSON,
and rebuilt from that JSON (checkpoints carry their config so a run rebuilds exactly)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from molt_cache.validate import (COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, Range,
                                 check_numbers)

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Build `cls` from a dict, refusing unknown keys by name (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    return cls(**data)


def save_json(cfg: Any, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


@dataclass
class HeadsConfig:
    """The MoLT / baseline heads (method.md, 'Heads' and 'Fusion')."""

    model: str = "molt"  # "molt" | "baseline" | "text-only" | "image-only"
    d_common: int = 1024  # d_c, width of the shared latent space
    layers: int = 4  # L_s, last blocks of each encoder paired from the end
    fbp_stride: int = 4  # s, sum-pool stride of factorized bilinear pooling
    fbp_signed_sqrt: bool = False  # MFB's power normalization before the L2 norm
    cca_ridge: float = 10.0  # ridge relative to each covariance's mean eigenvalue (docs/heads.md: why 10)
    cca_top_k: int = 16  # keep the k largest canonical correlations; 0 = all
    ablate: list[str] = field(default_factory=list)  # subset of cross-attn,cca,M,fusion,fbp
    num_classes: int = 0
    multi_label: bool = False
    dropout: float = 0.0

    NUMERIC: ClassVar[dict[str, Range]] = {
        "d_common": COUNT, "layers": COUNT, "fbp_stride": COUNT, "cca_ridge": NON_NEGATIVE,
        "cca_top_k": NON_NEGATIVE_INT, "num_classes": NON_NEGATIVE_INT,
        "dropout": Range(lo=0, hi=1, hi_open=True)}

    def validate(self) -> None:
        check_numbers(self)


@dataclass
class TrainConfig:
    """`molt train-heads` (method.md, paper's settings as defaults)."""

    cache: list[str] = field(default_factory=list)
    run_dir: str = "runs/molt"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    alpha: float = 0.1  # weight of L_CCA
    beta: float = 0.9  # weight of the task loss
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    amp: str = "auto"  # "auto" (fp16 on CUDA, off on CPU) | "off" | "fp16" | "bf16"
    patience: int = 5  # early stopping on the val metric
    in_memory: bool = False  # alias of store="host" (kept: older run configs and scripts use it)
    store: str = "auto"  # feature store placement: auto (fastest that fits) | device | host | stream
    pairs_per_image: int = 0  # K > 0: training batches hold B/K images with K pairs each; 0 = i.i.d.
    num_workers: int = 0
    missing_rate: float = 0.0
    missing_type: str = "both"  # "both" | "text" | "image"
    train_noise: float = 0.0
    train_noise_on: str = "both"  # "image" | "text" | "both"
    reg: dict[str, float] = field(default_factory=dict)  # second-seed regularizers: name -> weight

    NUMERIC: ClassVar[dict[str, Range]] = {
        "epochs": COUNT, "batch_size": Range(lo=2, integer=True),  # DCCA needs two pairs a batch
        "lr": POSITIVE, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "seed": NON_NEGATIVE_INT,
        "patience": COUNT, "num_workers": NON_NEGATIVE_INT, "missing_rate": FRACTION,
        "train_noise": NON_NEGATIVE, "reg": NON_NEGATIVE}

    def validate(self) -> None:
        check_numbers(self)
        # checked here even when unused (--missing-rate 0, --train-noise 0), so a typo is refused
        # before any cache is read rather than accepted or caught after the store is loaded;
        # imported here: perturb pulls in torch, which `molt --help` should not wait for
        from molt_cache.perturb import MISSING_TYPES, NOISE_ON

        for option, value, valid in (("--missing-type", self.missing_type, MISSING_TYPES),
                                     ("--train-noise-on", self.train_noise_on, NOISE_ON)):
            if value not in valid:
                raise ValueError(f"unknown {option} {value!r}; valid: {list(valid)}")
