"""`molt train-heads`: train the MoLT (or baseline) heads from the feature cache alone.

setup → run → cleanup, torchtune-style: `train_heads()` only orchestrates; the forward plus loss
of one batch lives in `training_step()`; `evaluate()` is shared with `molt robustness`.
No encoder is imported here: stage two reads the cache and nothing else.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from molt_cache.batch import FeatureBatch
from molt_cache.cache.store import FeatureStore, choose_placement, make_batches, open_store
from molt_cache.cache.reader import CacheReader, check_compatible, open_cache
from molt_cache.config import HeadsConfig, TrainConfig, from_dict, to_dict
from molt_cache.finite import StepGuard, check_step
from molt_cache.heads.model import FeatureDims, build_heads
from molt_cache.losses.task import task_loss
from molt_cache.metrics import compute_metrics, primary_metric
from molt_cache.perturb import MissingTable, make_perturb

RUN_FILES = ("config.json", "heads.safetensors", "metrics.json", "log.jsonl")
# heads.safetensors metadata: the finished epoch whose heads it holds; "-1": the initial heads
EPOCH_KEY = "molt_cache.epoch"
# The training loop reads the loss back to the host (a device sync) only every this many steps.
LOG_EVERY = 20


class RunFileError(ValueError):
    """A run folder's config.json or heads.safetensors is malformed; names the file and the fix."""


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    epochs_run: int
    seconds: float


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision as in the paper, on CUDA only: fp16/bf16 autocast is 4-5x slower on CPU."""
    if spec == "off" or (spec == "auto" and device.type != "cuda"):
        return None
    if spec == "auto":
        return torch.float16
    table = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if spec not in table:
        raise ValueError(f"unknown amp {spec!r}; valid: auto, off, fp16, bf16")
    return table[spec]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def heads_config_for(reader: CacheReader, heads_cfg: HeadsConfig) -> HeadsConfig:
    """Fill what the cache decides (classes, task) and check what the user chose against it."""
    m = reader.manifest
    n_layers = len(m["text"]["layer_indices"])
    if heads_cfg.layers != n_layers or len(m["image"]["layer_indices"]) != n_layers:
        raise ValueError(
            f"heads use L_s={heads_cfg.layers} layers but the cache holds "
            f"{n_layers} text / {len(m['image']['layer_indices'])} image layers; "
            f"pass --layers {n_layers} or re-extract with --layers {heads_cfg.layers}"
        )
    heads_cfg.num_classes = len(m["dataset"]["labels"])
    heads_cfg.multi_label = m["dataset"]["task"] == "multi-label"
    return heads_cfg


def for_heads(heads, batch: FeatureBatch) -> FeatureBatch:
    """The batch in the layout `heads` takes: heads without image-once support (no `image_once`
    attribute) get one image row per pair."""
    return batch if getattr(heads, "image_once", False) else batch.per_pair()


def training_step(heads, batch: FeatureBatch, cfg: TrainConfig, heads_cfg: HeadsConfig, regularizers,
                  amp: torch.dtype | None, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + loss of one batch: L = α·L_CCA + β·L_task (+ Σ w_r·L_r). The parts are detached
    0-dim tensors on the device (reading them back is a host sync: the caller decides when)."""
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = heads(for_heads(heads, batch))
    loss_task = task_loss(out.logits.float(), batch.targets, heads_cfg.multi_label)
    loss = cfg.beta * loss_task
    parts = {"task": loss_task.detach()}
    if out.cca_loss is not None:
        loss = loss + cfg.alpha * out.cca_loss
        parts["cca"] = out.cca_loss.detach()
    if regularizers is not None and out.common:
        for name, value in regularizers(out.common).items():
            loss = loss + value  # already weighted
            parts[name] = value.detach()
    return loss, parts


@torch.no_grad()
def predict(heads, loader, device: torch.device, *, missing_strategy: str = "zero",
            amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets over a loader, in loader order. They stay on the device until the end:
    one read per evaluation, not one per batch."""
    heads.eval()
    logits, targets = [], []
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = heads(for_heads(heads, batch), missing_strategy=missing_strategy)
        logits.append(out.logits.float())
        targets.append(batch.targets)
    if not logits:
        raise ValueError("evaluation split is empty")
    return torch.cat(logits).cpu().numpy(), torch.cat([t.to(device) for t in targets]).cpu().numpy()


def evaluate(heads, loader, device: torch.device, multi_label: bool, *, missing_strategy: str = "zero",
             amp: torch.dtype | None = None) -> dict[str, float]:
    logits, targets = predict(heads, loader, device, missing_strategy=missing_strategy, amp=amp)
    return compute_metrics(logits, targets, multi_label)


@torch.no_grad()
def held_out_correlations(heads, loader, device: torch.device, top_k: int) -> dict:
    """Mean of the top-k canonical correlations per layer over a whole held-out split.

    In-batch training correlations are inflated when batch ≤ d_c (n points in more than n
    dimensions align for free); over a split larger than d_c, with a tiny ridge, they are not.
    """
    from molt_cache.losses.cca import canonical_correlations

    heads.eval()
    per_layer: list[tuple[list, list]] = []
    for batch in loader:
        out = heads(for_heads(heads, batch.to(device)))
        if not out.common:
            return {"skipped": "the model has no common space (baseline)"}
        if not per_layer:
            per_layer = [([], []) for _ in out.common]
        for (imgs, txts), s in zip(per_layer, out.common):
            imgs.append(s.image.float())
            txts.append(s.text.float())
    h = [(torch.cat(i).cpu(), torch.cat(t).cpu()) for i, t in per_layer]  # read once per layer, not per batch
    n, d = h[0][0].shape
    if n <= d:
        return {"skipped": f"split has {n} pairs, not more than d_c={d}: sample correlations would be inflated"}
    k = top_k or d
    return {"top_k": k, "pairs": n,
            "per_layer": [float(canonical_correlations(a, b, ridge=1e-3, top_k=k).mean()) for a, b in h]}


def save_run(run_dir: Path, heads, heads_cfg: HeadsConfig, train_cfg: TrainConfig, dims: FeatureDims,
             manifest: dict, *, epoch: int | None = None) -> None:
    """Checkpoint as safetensors + JSON config: nothing pickled, and the run rebuilds exactly.
    `epoch`: the finished epoch whose heads these are (-1: the initial heads), kept in the
    checkpoint's own metadata (`EPOCH_KEY`), so it can never disagree with the weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    tmp = run_dir / "heads.safetensors.tmp"
    save_file(state, str(tmp), metadata=None if epoch is None else {EPOCH_KEY: str(epoch)})
    tmp.replace(run_dir / "heads.safetensors")  # atomic: a crash never leaves half a checkpoint
    config = {
        "heads": to_dict(heads_cfg),
        "train": to_dict(train_cfg),
        "dims": asdict(dims),
        # `extraction` (encoder specs, batching) lets `molt predict` load the same encoders again
        "cache": {"dataset": manifest["dataset"], "text": manifest["text"], "image": manifest["image"],
                  "extraction": manifest.get("extraction")},
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_run_files(run_dir: Path) -> None:
    missing = [f for f in ("config.json", "heads.safetensors") if not (run_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a train-heads run folder: missing {missing}")


def _unreadable(weights_path: Path, e: BaseException) -> RunFileError:
    return RunFileError(f"{weights_path}: not a readable safetensors checkpoint ({e}); the run "
                        "folder is damaged, retrain it with `molt train-heads`")


def checkpoint_epoch(run_dir: str | Path) -> int | None:
    """The finished epoch whose heads a run's heads.safetensors holds, -1 for the initial
    (untrained) heads, read from the checkpoint's metadata (its header only); None for a
    checkpoint saved before molt-cache recorded it."""
    weights_path = Path(run_dir) / "heads.safetensors"
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise _unreadable(weights_path, e) from None
    try:
        return int(meta[EPOCH_KEY]) if EPOCH_KEY in meta else None
    except ValueError:
        raise RunFileError(f"{weights_path}: metadata {EPOCH_KEY}={meta[EPOCH_KEY]!r} is not an epoch number; "
                           "the run folder is damaged, retrain it with `molt train-heads`") from None


def logged_epochs(run_dir: str | Path) -> int:
    """Epoch records in a run's log.jsonl (train-heads appends one per finished epoch); a
    malformed line (a write cut short) is not counted."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        count += isinstance(record, dict) and "epoch" in record
    return count


def check_run_trained(run_dir: str | Path) -> None:
    """Refuse a run folder whose training finished no epoch: train-heads saves the initial heads
    before epoch 0, so a run stopped in epoch 0 (non-finite features, Ctrl-C, a crash) holds
    untrained heads that would score like chance. The marker is the checkpoint's own epoch
    (`checkpoint_epoch`); a checkpoint saved before it was recorded counts as trained when its
    run has metrics.json or an epoch record in log.jsonl."""
    run_dir = Path(run_dir)
    _check_run_files(run_dir)
    epoch = checkpoint_epoch(run_dir)
    if epoch is not None and epoch >= 0:
        return
    if epoch is None and ((run_dir / "metrics.json").is_file() or logged_epochs(run_dir)):
        return
    why = ("its heads.safetensors holds the initial, untrained heads (train-heads stopped before the end of "
           "epoch 0)" if epoch is not None else
           "no epoch record in its log.jsonl and no metrics.json, so heads.safetensors holds the initial, "
           "untrained heads (a copy of a run that did finish an epoch needs its log.jsonl or metrics.json beside it)")
    raise RunFileError(f"{run_dir}: training finished no epoch: {why}; train it again with `molt train-heads`")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", *, require_trained: bool = True):
    """Rebuild trained heads from a run folder. Returns (heads, HeadsConfig, TrainConfig, config dict).
    Refuses a run whose training finished no epoch (`check_run_trained`) unless not `require_trained`."""
    run_dir = Path(run_dir)
    _check_run_files(run_dir)
    config_path, weights_path = run_dir / "config.json", run_dir / "heads.safetensors"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{config_path}: not valid JSON ({e}); the run folder is damaged, "
                           "retrain it with `molt train-heads`") from None
    try:
        heads_cfg = from_dict(HeadsConfig, config["heads"])
        train_cfg = from_dict(TrainConfig, config["train"])
        dims = FeatureDims(**config["dims"])
        for key in ("dataset", "text", "image"):
            config["cache"][key]  # noqa: B018 - robustness compares these with the cache
    except (KeyError, TypeError, ValueError) as e:
        raise RunFileError(f"{config_path}: not a train-heads config ({type(e).__name__}: {e}); "
                           "retrain it with `molt train-heads`") from None
    heads = build_heads(heads_cfg, dims)
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise _unreadable(weights_path, e) from None
    if require_trained:
        check_run_trained(run_dir)
    try:
        heads.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RunFileError(f"{weights_path}: does not fit the heads its config.json describes "
                           f"({' '.join(first[:2])})") from None
    return heads.to(device).eval(), heads_cfg, train_cfg, config


def check_run_matches_cache(config: dict, reader: CacheReader) -> None:
    """Heads trained on one encoder pair are meaningless on another: refuse, naming the difference."""
    m = reader.manifest
    diffs = []
    for mod in ("text", "image"):
        for key in ("kind", "name", "weights_sha256", "layer_indices", "layer_widths", "final_width"):
            a, b = config["cache"][mod].get(key), m[mod].get(key)
            if a != b:
                diffs.append(f"{mod}.{key}: run {a!r} vs cache {b!r}")
    if config["cache"]["dataset"]["labels"] != m["dataset"]["labels"]:
        diffs.append("dataset.labels differ")
    if diffs:
        raise ValueError(f"run does not match cache {reader.path}: " + "; ".join(diffs))


def training_perturb(cfg: TrainConfig, missing_table: MissingTable | None, epoch: int):
    """What training does to a batch in `epoch`: the missing table is drawn once (as in
    missing-aware prompting), the feature noise is redrawn every epoch, as augmentation should be,
    from a stream apart from robustness' (seed, pair) noise."""
    return make_perturb(noise=cfg.train_noise, noise_on=cfg.train_noise_on, missing_table=missing_table,
                        strategy="zero", seed=cfg.seed * 100_003 + epoch + 1)


def build_regularizers(cfg: TrainConfig, heads_cfg: HeadsConfig):
    if not cfg.reg:
        return None
    if heads_cfg.model != "molt":
        raise ValueError(f"--reg acts on MoLT's common-space states; the {heads_cfg.model} heads have none "
                         f"(drop --reg or use --model molt)")
    from molt_cache.losses.structure import StructureRegularizers

    return StructureRegularizers(cfg.reg, heads_cfg.d_common, heads_cfg.layers)


def store_choice(cfg: TrainConfig) -> str:
    """`--store`, with `--in-memory` as the alias of `--store host`."""
    if cfg.in_memory:
        if cfg.store not in ("auto", "host"):
            raise ValueError(f"--in-memory means --store host; it contradicts --store {cfg.store}")
        return "host"
    return cfg.store


def train_heads(cfg: TrainConfig, heads_cfg: HeadsConfig, *,
                on_epoch: Callable[[dict], None] | None = None,
                on_step: Callable[[int, int, int, float], None] | None = None,
                on_info: Callable[[str], None] | None = None) -> TrainResult:
    """Train heads on the caches' train split; best-on-val checkpoint; test metrics at the end.

    on_epoch(record) after each epoch (the log.jsonl record); on_step(epoch, step, steps, loss)
    after each optimizer step (progress bars; the loss is read back every LOG_EVERY steps and the
    last value repeated between); on_info(line) for setup facts (where the features are held)."""
    # -- setup ---------------------------------------------------------------------------------
    cfg.validate()
    heads_cfg.validate()
    if not cfg.cache:
        raise ValueError("no cache given: pass --cache DIR (made by `molt extract`)")
    if not 0.0 <= cfg.missing_rate <= 1.0:
        raise ValueError(f"--missing-rate must be in [0, 1], got {cfg.missing_rate}")
    if cfg.pairs_per_image < 0:
        raise ValueError(f"--pairs-per-image must be >= 0 (0 = i.i.d. pairs), got {cfg.pairs_per_image}")
    store_kind = store_choice(cfg)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any((run_dir / f).exists() for f in RUN_FILES):
        raise FileExistsError(f"{run_dir} already holds a run; choose another --run-dir or remove it")
    readers = [open_cache(p) for p in cfg.cache]
    check_compatible(readers)
    heads_cfg = heads_config_for(readers[0], heads_cfg)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    seed_everything(cfg.seed)
    dims = FeatureDims.from_manifest(readers[0].manifest)
    heads = build_heads(heads_cfg, dims).to(device)
    regularizers = build_regularizers(cfg, heads_cfg)
    params = list(heads.parameters())
    if regularizers is not None:
        regularizers.to(device)
        params += list(regularizers.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    # GradScaler only for fp16: bf16 has fp32's range and needs no loss scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    guard = StepGuard(optimizer, params, check_grads=not scaler.is_enabled(), device=device)

    def splits(name: str):
        return [r.split(name) for r in readers if name in r.splits]

    train_splits, val_splits, test_splits = splits("train"), splits("val"), splits("test")
    if not train_splits or not val_splits:
        raise ValueError(f"cache {cfg.cache} needs train and val splits; it has {readers[0].splits}")
    missing_table = None
    if cfg.missing_rate > 0:
        # indexed by the pair's index within its split: mixed caches of one dataset (clean + noised
        # copies) share each pair's missing status, and each cache sees exactly the requested rate
        n_pairs = max(s.num_pairs for s in train_splits)
        missing_table = MissingTable.sample(n_pairs, cfg.missing_rate, cfg.missing_type, cfg.seed)

    # Where the features live, decided once for all splits together (they share the memory).
    placement, placement_line = choose_placement([*train_splits, *val_splits, *test_splits], store_kind, device)
    if on_info:
        on_info(placement_line)
    stores: dict[int, FeatureStore | None] = {}
    for split_list in (train_splits, val_splits, test_splits):
        if split_list:
            # val and test are only scored: inf/NaN there is refused now, before any training; the
            # train split's are caught per step by the StepGuard
            stores[id(split_list)] = open_store(split_list, placement, device,
                                                check_finite=split_list is not train_splits)

    def loader(split_list, *, shuffle: bool, epoch: int = 0, perturb_fn=None):
        return make_batches(split_list, store=stores[id(split_list)], batch_size=cfg.batch_size,
                            shuffle=shuffle, seed=cfg.seed, epoch=epoch,
                            pairs_per_image=cfg.pairs_per_image if shuffle else 0,
                            num_workers=cfg.num_workers, perturb=perturb_fn,
                            pin_memory=device.type == "cuda")  # page-locked only when copies go to a GPU

    run_dir.mkdir(parents=True, exist_ok=True)
    save_run(run_dir, heads, heads_cfg, cfg, dims, readers[0].manifest, epoch=-1)
    metric = primary_metric(heads_cfg.multi_label)
    best, best_epoch, stale = -math.inf, -1, 0
    log_path = run_dir / "log.jsonl"
    t0 = time.perf_counter()

    # -- run -----------------------------------------------------------------------------------
    epoch = 0
    for epoch in range(cfg.epochs):
        heads.train()
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
        steps = 0
        shown_loss = float("nan")
        train_loader = loader(train_splits, shuffle=True, epoch=epoch, perturb_fn=training_perturb(cfg, missing_table, epoch))
        where = dict(epoch=epoch, best_epoch=best_epoch, run_dir=run_dir, splits=train_splits)
        for k, batch in enumerate(train_loader):
            if batch.size < 2:  # DCCA needs two samples; a lone last pair (a different one each epoch) waits
                continue
            batch = batch.to(device, non_blocking=True)
            try:
                loss, parts = training_step(heads, batch, cfg, heads_cfg, regularizers, amp, device)
            except RuntimeError as e:  # e.g. eigh on NaN features: say so when that is the cause
                guard.readback_pending(**where)  # an earlier non-finite step, if any, came first
                check_step(error=e, step=steps + 1, batch=batch, **where)
                raise
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # never train on NaN: a non-finite step changes nothing on the device; the host
            # learns of it at the next readback, before anything is evaluated or saved
            guard.step(scaler, loss, batch, steps + 1, rebuild=partial(train_loader.batch_at, k))
            scaler.update()
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v.float().clone()
            steps += 1
            if steps % LOG_EVERY == 1 or steps == len(train_loader):  # the only host reads of the epoch
                shown_loss = guard.readback(loss=parts["loss"], **where)
            if on_step:
                on_step(epoch, steps, len(train_loader), shown_loss)
        guard.readback(**where)  # the epoch's last steps, before evaluating and saving
        val = evaluate(heads, loader(val_splits, shuffle=False), device, heads_cfg.multi_label, amp=amp)
        means = (torch.stack(list(sums.values())) / max(steps, 1)).tolist() if sums else []  # one read
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in zip(sums, means)},
                  **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - t0}
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if val[metric] > best:  # strict: ties keep the earlier epoch, so reruns agree
            best, best_epoch, stale = val[metric], epoch, 0
            save_run(run_dir, heads, heads_cfg, cfg, dims, readers[0].manifest, epoch=epoch)
        else:
            stale += 1
        record["best"] = epoch == best_epoch
        if on_epoch:
            on_epoch(record)
        if stale >= cfg.patience:
            break

    # -- cleanup: reload the best checkpoint, score it -----------------------------------------
    heads, *_ = load_run(run_dir, device, require_trained=False)  # best_epoch >= 0 unless val scored NaN
    val = evaluate(heads, loader(val_splits, shuffle=False), device, heads_cfg.multi_label, amp=amp)
    test = evaluate(heads, loader(test_splits, shuffle=False), device, heads_cfg.multi_label, amp=amp) if test_splits else {}
    val_cca = held_out_correlations(heads, loader(val_splits, shuffle=False), device, heads_cfg.cca_top_k)
    result = TrainResult(run_dir, best_epoch, val, test, epoch + 1, time.perf_counter() - t0)
    (run_dir / "metrics.json").write_text(json.dumps(
        {"best_epoch": best_epoch, "epochs_run": epoch + 1, "val": val, "test": test,
         "feature_store": placement.name,
         "val_canonical_correlations": val_cca, "seconds": result.seconds}, indent=2) + "\n")
    return result
