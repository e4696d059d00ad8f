"""Use a trained run on new image–text pairs: `Classifier` (Python) and `molt predict` (CLI).

A run folder (`molt train-heads`) holds the heads and the identity of the encoders whose cache
they were trained on. `Classifier.from_run` loads those encoders again, refuses them when their
weights checksum or layer choice differs from the run's, and `predict` turns images and texts into
per-layer states through `molt_cache.extract.encode` — the code `molt extract` writes the cache
with — rounds them to the cache's storage dtype, and applies the heads.

Either modality may be absent per row (None or an empty string). What stands in for it is the
`strategy`, as in `molt robustness`: "zero" (zero features, marked absent), "translate" (marked
absent; MoLT substitutes the present modality's common-space states), "empty" (an empty text or
the blank mid-gray image through the frozen encoder, as `molt extract --empty` makes). A row with
neither modality, or an image that cannot be read, is a bad row: an error naming the row under
on_bad="error", a reported skip under "skip".
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from molt_cache.batch import FeatureBatch
from molt_cache.cache.reader import to_float32
from molt_cache.datasets.base import BadRow, DatasetError
from molt_cache.finite import NonFiniteFeatureError
from molt_cache.extract.encode import ItemStates, encode_items, load_image, text_batches
from molt_cache.encoders.text_limits import tokenize_splits

STRATEGIES = ("zero", "empty", "translate")
ON_BAD = ("error", "skip")
# Multi-label: a label is predicted where sigmoid(logit) > threshold; 0.5 is what the F1 metrics
# of `molt train-heads` use (molt_cache/metrics.py).
DEFAULT_THRESHOLD = 0.5
# What must agree between the encoders loaded now and the ones the heads were trained on: the
# weights, the layer choice, and the shapes that follow from them. Names and paths may differ
# (a model folder moved); dtype may differ (states are rounded to the cache's storage dtype).
IDENTITY_KEYS = ("weights_sha256", "layer_indices", "layer_widths", "final_width", "pooled_width",
                 "final_is_last_layer")


class RunMismatchError(ValueError):
    """The encoders loaded for prediction are not the ones the run's heads were trained on."""


@dataclass
class PredictInput:
    """One row to classify. image: a path, a PIL image or None; text: a string or None.
    An empty or whitespace-only text counts as absent."""

    id: str
    image: Any = None
    text: str | None = None
    source: str = ""  # "file:line" for error messages

    @property
    def has_text(self) -> bool:
        return self.text is not None and bool(str(self.text).strip())

    @property
    def has_image(self) -> bool:
        return self.image is not None and not (isinstance(self.image, str) and not self.image.strip())


@dataclass
class Prediction:
    """One row's result.

    labels / probabilities: the top-k labels, most probable first, with their probability
    (softmax over classes for single-label runs; sigmoid per label for multi-label runs, so they
    need not sum to 1). predicted: single-label, the top label; multi-label, every label whose
    probability exceeds `threshold` (possibly none). logits: (C,) float32, in the run's label order.
    """

    id: str
    labels: list[str]
    probabilities: list[float]
    predicted: list[str]
    present: dict[str, bool]
    logits: np.ndarray = field(repr=False)
    threshold: float | None = None  # multi-label only

    def to_json(self) -> dict:
        d = {"id": self.id, "predicted": self.predicted,
             "top_k": [{"label": lab, "probability": round(p, 6)} for lab, p in zip(self.labels, self.probabilities)],
             "present": self.present}
        if self.threshold is not None:
            d["threshold"] = self.threshold
        return d


@dataclass
class PredictResult:
    predictions: list[Prediction]
    bad_rows: list[BadRow]  # skipped under on_bad="skip": (row id or file:line, reason)
    strategy: str
    multi_label: bool


def _spec_of(identity: dict) -> str:
    return f"{identity['kind']}:{identity['name']}" if identity.get("kind") not in (None, "") else ""


def encoder_specs(config: dict) -> dict[str, Any]:
    """text_spec / image_spec / image_weights / batch sizes that made the run's cache: from the run
    (runs saved since `molt predict` exists), else from the training cache's manifest when it is
    still there, else rebuilt from the encoder identities (kind:name)."""
    ex = config["cache"].get("extraction")
    if not ex:
        for cache in config.get("train", {}).get("cache", []):
            path = Path(cache) / "manifest.json"
            if path.is_file():
                ex = json.loads(path.read_text()).get("extraction")
                if ex:
                    break
    if not ex:
        ex = {"text_spec": _spec_of(config["cache"]["text"]), "image_spec": _spec_of(config["cache"]["image"])}
    return {"text_spec": ex.get("text_spec"), "image_spec": ex.get("image_spec"),
            "image_weights": ex.get("image_weights"), "batch_tokens": ex.get("batch_tokens", 16384),
            "image_batch_size": ex.get("image_batch_size", 64)}


def check_encoders_match_run(config: dict, text_encoder, image_encoder, run: Path) -> None:
    """Refuse encoders whose weights or layer choice differ from the run's cache, naming each field."""
    diffs = []
    for modality, enc in (("text", text_encoder), ("image", image_encoder)):
        trained = config["cache"][modality]
        now = enc.identity
        for key in IDENTITY_KEYS:
            if key in trained and trained[key] != getattr(now, key):
                diffs.append(f"{modality}.{key}: run trained on {trained[key]!r}, encoder loaded now has "
                             f"{getattr(now, key)!r}")
    if diffs:
        raise RunMismatchError(f"the encoders loaded for prediction differ from the ones the heads in {run} "
                               "were trained on:\n  " + "\n  ".join(diffs)
                               + "\nload the same weights and layer choice (--text-encoder / --image-encoder / "
                               "--image-weights; from Python text= / image= / image_weights=), "
                               "or train heads on a cache of these encoders")


class Classifier:
    """Trained heads plus the frozen encoders they were trained behind.

    Build with `Classifier.from_run(run_dir, device=...)`; classify with `.predict(images, texts)`.
    """

    def __init__(self, heads, heads_cfg, config: dict, text_encoder, image_encoder, *, run: Path,
                 strategy: str = "zero", batch_size: int = 32, batch_tokens: int = 16384,
                 threshold: float = DEFAULT_THRESHOLD):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; valid: {list(STRATEGIES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        check_encoders_match_run(config, text_encoder, image_encoder, run)
        self.heads, self.heads_cfg, self.config = heads, heads_cfg, config
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.run, self.strategy, self.batch_size, self.batch_tokens = run, strategy, batch_size, batch_tokens
        self.threshold = threshold
        self.labels: list[str] = list(config["cache"]["dataset"]["labels"])
        self.multi_label: bool = bool(heads_cfg.multi_label)
        self.device = next(heads.parameters()).device
        # states are rounded to what the heads were trained on, whatever dtype the encoders run in
        self.dtypes = {m: config["cache"][m]["dtype"] for m in ("text", "image")}

    @classmethod
    def from_run(cls, run: str | Path, *, device: str = "auto", strategy: str = "zero", batch_size: int = 32,
                 threshold: float = DEFAULT_THRESHOLD, text: str | None = None, image: str | None = None,
                 image_weights: str | None = None, dtype: str = "auto", text_encoder=None,
                 image_encoder=None) -> "Classifier":
        """Load the heads of `run` (a `molt train-heads` folder) and the encoders of its cache.

        device: "auto" | "cpu" | "cuda" | "cuda:N". text / image / image_weights override the
        encoder specs the run records (a model folder that moved); text_encoder / image_encoder
        pass already-built encoders. dtype: the encoders' compute dtype ("auto": fp16 on CUDA,
        fp32 on CPU). Raises FileNotFoundError (not a run folder), RunMismatchError (other weights
        or layers than the run's), ValueError (bad options)."""
        from molt_cache.train import load_run, resolve_device

        run = Path(run)
        dev = resolve_device(device)
        heads, heads_cfg, _train_cfg, config = load_run(run, dev)
        specs = encoder_specs(config)
        layers = len(config["cache"]["text"]["layer_indices"])
        if text_encoder is None or image_encoder is None:
            from molt_cache.encoders import create_image_encoder, create_text_encoder

            text_spec, image_spec = text or specs["text_spec"], image or specs["image_spec"]
            if not text_spec or not image_spec:
                raise ValueError(f"{run} does not say which encoders made its cache; pass --text and --image")
            if text_encoder is None:
                # the token cap the cache was extracted with (--max-length), so long texts are cut alike
                requested = config["cache"]["text"].get("extra", {}).get("max_length_limits", {}).get("requested")
                text_encoder = create_text_encoder(text_spec, device=dev, dtype=dtype, layers=layers,
                                                   max_length=requested)
            if image_encoder is None:
                image_encoder = create_image_encoder(image_spec, device=dev, dtype=dtype, layers=layers,
                                                     weights=image_weights or specs["image_weights"])
        return cls(heads, heads_cfg, config, text_encoder, image_encoder, run=run, strategy=strategy,
                   batch_size=batch_size, batch_tokens=specs["batch_tokens"], threshold=threshold)

    # -- encoding ---------------------------------------------------------------------------

    @staticmethod
    def _name_row(e: NonFiniteFeatureError, row_ids: list[str]) -> NonFiniteFeatureError:
        e.sample_id = row_ids[e.item]  # encode_items numbered the batch by position in `row_ids`
        e.args = (e._message(),)
        return e

    def _encode_texts(self, texts: list[str], row_ids: list[str]) -> list[ItemStates]:
        (ids,), _ = tokenize_splits(self.text_encoder, [("input", texts)])  # as extraction tokenizes
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        everything = np.arange(len(ids))
        states: list[ItemStates | None] = [None] * len(ids)
        # the batching `molt extract` uses: equal-length batches, no padding token in any batch
        for batch in text_batches(everything, everything, lengths, self.batch_tokens, single=False):
            try:
                encoded = encode_items(self.text_encoder, [ids[k] for k in batch], modality="text",
                                       dtype=self.dtypes["text"], items=batch)
            except NonFiniteFeatureError as e:
                raise self._name_row(e, row_ids) from None
            for k, item in zip(batch, encoded.items):
                states[k] = item
        return states

    def _encode_images(self, pixels: list[torch.Tensor], row_ids: list[str]) -> list[ItemStates]:
        enc = self.image_encoder
        if not pixels:
            return []
        px = torch.stack(pixels).to(enc.device, enc.dtype)
        try:
            return encode_items(enc, px, modality="image", dtype=self.dtypes["image"]).items
        except NonFiniteFeatureError as e:
            raise self._name_row(e, row_ids) from None

    def _absent(self, modality: str) -> ItemStates:
        """Zero states for an absent modality ("zero" / "translate"): the image keeps its fixed
        token count, a text gets one token (the heads see zeros either way)."""
        ident = (self.text_encoder if modality == "text" else self.image_encoder).identity
        n = 1 if modality == "text" else self.image_encoder.num_tokens
        widths = list(ident.layer_widths) + ([] if ident.final_is_last_layer else [ident.final_width])
        return ItemStates(tokens=[np.zeros((n, w), np.float32) for w in widths],
                          pooled=np.zeros(ident.pooled_width, np.float32))

    def _modality_batch(self, modality: str, items: list[ItemStates]) -> tuple:
        """(layers, final, pooled, mask) of one modality, padded at the end to the batch's longest."""
        ident = (self.text_encoder if modality == "text" else self.image_encoder).identity
        dtype = self.dtypes[modality]
        lengths = np.array([it.num_tokens for it in items], np.int64)
        T = int(lengths.max())
        arrays = []
        for k in range(len(items[0].tokens)):
            out = np.zeros((len(items), T, items[0].tokens[k].shape[1]), np.float32)  # (B, T, D)
            for b, it in enumerate(items):
                out[b, :lengths[b]] = to_float32(it.tokens[k], dtype) if it.tokens[k].dtype != np.float32 \
                    else it.tokens[k]
            arrays.append(torch.from_numpy(out))
        n_layers = len(ident.layer_widths)
        layers = arrays[:n_layers]
        final = layers[-1] if ident.final_is_last_layer else arrays[n_layers]
        pooled = torch.from_numpy(np.stack([
            to_float32(it.pooled, dtype) if it.pooled.dtype != np.float32 else it.pooled for it in items]))
        mask = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None])
        return layers, final, pooled, mask

    @torch.no_grad()
    def _logits(self, rows: list[PredictInput], pixels: dict[int, torch.Tensor]) -> np.ndarray:
        """Logits (B, C) of rows that each have at least one modality (pixels: row -> transformed image)."""
        empty = self.strategy == "empty"
        text_rows = [i for i, r in enumerate(rows) if r.has_text or empty]
        texts = [str(rows[i].text) if rows[i].has_text else "" for i in text_rows]
        text_states = dict(zip(text_rows, self._encode_texts(texts, [rows[i].id for i in text_rows])
                               if texts else []))
        image_rows = [i for i, r in enumerate(rows) if r.has_image or empty]
        blank = None
        pix = []
        for i in image_rows:
            if i in pixels:
                pix.append(pixels[i])
            else:
                if blank is None:
                    blank = self.image_encoder.transform(load_image(None))
                pix.append(blank)
        image_states = dict(zip(image_rows, self._encode_images(pix, [rows[i].id for i in image_rows])))
        text_items = [text_states.get(i) or self._absent("text") for i in range(len(rows))]
        image_items = [image_states.get(i) or self._absent("image") for i in range(len(rows))]
        text_present = torch.tensor([empty or r.has_text for r in rows])
        image_present = torch.tensor([empty or r.has_image for r in rows])
        batch = FeatureBatch.complete_pairs(self._modality_batch("text", text_items),
                                            self._modality_batch("image", image_items),
                                            targets=torch.zeros(len(rows), dtype=torch.int64),
                                            index=torch.arange(len(rows)))
        batch.text_present, batch.image_present = text_present, image_present
        heads_strategy = "translate" if self.strategy == "translate" else "zero"
        out = self.heads(batch.to(self.device), missing_strategy=heads_strategy)
        return out.logits.float().cpu().numpy()

    # -- public API -------------------------------------------------------------------------

    def predict(self, images: Sequence[Any] | None = None, texts: Sequence[str | None] | None = None, *,
                ids: Sequence[str] | None = None, top_k: int = 5, on_bad: str = "error",
                on_progress: Callable[[int, int], None] | None = None) -> PredictResult:
        """Classify N image–text pairs.

        images: N paths (str / Path) or PIL images, None where a row has no image; or None for
        no images at all. texts: N strings, None or "" where a row has no text; or None.
        ids: N row names for the output (default "0".."N-1"). top_k: labels kept per row (≥ 1).
        on_bad: "error" raises DatasetError naming the first row with neither modality or an
        unreadable image; "skip" leaves such rows out and lists them in `bad_rows`.
        on_progress(rows_done, rows_total) after each batch of `batch_size` rows.
        Returns PredictResult; its predictions keep input order (skipped rows omitted).
        """
        n = len(images) if images is not None else len(texts) if texts is not None else 0
        if images is not None and texts is not None and len(images) != len(texts):
            raise ValueError(f"images and texts differ in length: {len(images)} vs {len(texts)} "
                             "(use None for an absent modality in a row)")
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} rows")
        rows = [PredictInput(id=str(ids[i]) if ids is not None else str(i),
                             image=images[i] if images is not None else None,
                             text=texts[i] if texts is not None else None) for i in range(n)]
        return self.predict_rows(rows, top_k=top_k, on_bad=on_bad, on_progress=on_progress)

    def predict_rows(self, rows: list[PredictInput], *, top_k: int = 5, on_bad: str = "error",
                     on_progress: Callable[[int, int], None] | None = None,
                     bad_rows: list[BadRow] | None = None) -> PredictResult:
        """`predict` on PredictInput rows (what `read_inputs` returns); `bad_rows` already found
        while reading are carried into the result."""
        if on_bad not in ON_BAD:
            raise ValueError(f"unknown on_bad {on_bad!r}; valid: {list(ON_BAD)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        bad = list(bad_rows or [])
        predictions: list[Prediction] = []
        done = 0
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            kept, pixels = [], {}
            for r in chunk:
                where = r.source or f"row {r.id}"
                reason = None
                if not r.has_text and not r.has_image:
                    reason = "neither an image nor a text"
                elif r.has_image:
                    try:
                        pixels[len(kept)] = self.image_encoder.transform(load_image(r.image))
                    except DatasetError as e:
                        reason = str(e)
                if reason is not None:
                    if on_bad == "error":
                        raise DatasetError(f"{where} (id {r.id}): {reason} (pass --on-bad skip to skip and "
                                           "report such rows)")
                    bad.append(BadRow(f"{where} (id {r.id})", reason))
                    continue
                kept.append(r)
            if kept:
                logits = self._logits(kept, pixels)
                predictions += [self._prediction(r, lg, top_k) for r, lg in zip(kept, logits)]
            done += len(chunk)
            if on_progress:
                on_progress(done, len(rows))
        return PredictResult(predictions, bad, self.strategy, self.multi_label)

    def _prediction(self, row: PredictInput, logits: np.ndarray, top_k: int) -> Prediction:
        z = logits.astype(np.float64)
        if self.multi_label:
            probs = 1.0 / (1.0 + np.exp(-z))
        else:
            e = np.exp(z - z.max())
            probs = e / e.sum()
        order = np.argsort(-probs, kind="stable")[:top_k]
        if self.multi_label:
            predicted = [self.labels[k] for k in np.flatnonzero(probs > self.threshold)]
        else:
            predicted = [self.labels[int(order[0])]]
        return Prediction(id=row.id, labels=[self.labels[int(k)] for k in order],
                          probabilities=[float(probs[k]) for k in order], predicted=predicted,
                          present={"text": row.has_text, "image": row.has_image}, logits=logits,
                          threshold=self.threshold if self.multi_label else None)


def read_inputs(path: str | Path, *, on_bad: str = "error") -> tuple[list[PredictInput], list[BadRow]]:
    """Rows to classify from a JSONL or CSV file (with a header): fields `id` (optional; default
    the line number), `image` (a path relative to the file's folder; absent, null or "" = no
    image), `text` (absent, null or "" = no text). Other fields are ignored. A malformed line is
    a bad row (DatasetError naming file:line under on_bad="error"). Nothing read is evaluated."""
    if on_bad not in ON_BAD:
        raise ValueError(f"unknown on_bad {on_bad!r}; valid: {list(ON_BAD)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    base = path.parent
    rows: list[PredictInput] = []
    bad: list[BadRow] = []

    def add(lineno: int, row: dict | str) -> None:
        where = f"{path}:{lineno}"
        if isinstance(row, str):
            if on_bad == "error":
                raise DatasetError(f"{where}: {row} (pass --on-bad skip to skip and report such rows)")
            bad.append(BadRow(where, row))
            return
        image = row.get("image")
        text = row.get("text")
        if image is not None and not isinstance(image, str):
            image = str(image)
        if text is not None and not isinstance(text, str):
            text = str(text)
        image = str(base / image) if image and image.strip() else None
        rows.append(PredictInput(id=str(row.get("id") or lineno), image=image, text=text or None, source=where))

    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DatasetError(f"{path}: empty CSV (a header row with image,text[,id] is required)")
            unknown = {"image", "text"} - set(reader.fieldnames)
            if unknown == {"image", "text"}:
                raise DatasetError(f"{path}: the header {reader.fieldnames} has neither an 'image' nor a 'text' column")
            for row in reader:
                if None in row or None in row.values():
                    add(reader.line_num, f"malformed CSV line: expected {len(reader.fieldnames)} columns "
                                         f"{reader.fieldnames}")
                else:
                    add(reader.line_num, row)
        else:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    add(lineno, f"malformed JSON: {e}")
                    continue
                add(lineno, row if isinstance(row, dict) else "malformed row: not a JSON object")
    return rows, bad
