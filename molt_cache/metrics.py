"""Task metrics: accuracy (and macro F1) for single-label sets, F1 micro / macro at threshold 0.5
for multi-label sets (MM-IMDB), as the paper reports them. Macro F1 on a single-label set is not in
the paper; it is reported because real sets are imbalanced (OpenClipart: 23 % majority class),
where accuracy hides the small classes."""
from __future__ import annotations

import numpy as np


def single_label_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """logits (N, C), targets (N,) class indices -> accuracy and macro F1 (fractions).

    Macro F1: the unweighted mean over classes that occur in targets or predictions of
    2·TP / (2·TP + FP + FN), one-vs-rest on the argmax prediction (scikit-learn's
    f1_score(average="macro") restricted to the labels seen)."""
    if not len(targets):
        return {"accuracy": float("nan"), "f1_macro": float("nan")}
    pred = logits.argmax(axis=1)
    classes = logits.shape[1]
    one_hot = np.eye(classes, dtype=bool)
    f1_macro = multi_label_metrics(np.where(one_hot[pred], 1.0, -1.0), one_hot[targets])["f1_macro"]
    return {"accuracy": float((pred == targets).mean()), "f1_macro": f1_macro}


def multi_label_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """logits (N, C), targets (N, C) 0/1. Predicted positive where sigmoid(logit) > 0.5, i.e. logit > 0.

    Macro F1 averages over labels that occur in targets or predictions (a label absent from both
    has no defined F1 and is left out, as scikit-learn does with zero_division handling aside).
    """
    pred = logits > 0
    true = targets.astype(bool)
    tp = (pred & true).sum(axis=0).astype(np.float64)
    fp = (pred & ~true).sum(axis=0).astype(np.float64)
    fn = (~pred & true).sum(axis=0).astype(np.float64)
    denom_micro = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = 2 * tp.sum() / denom_micro if denom_micro else 0.0
    denom = 2 * tp + fp + fn
    used = denom > 0
    macro = float((2 * tp[used] / denom[used]).mean()) if used.any() else 0.0
    return {"f1_micro": float(micro), "f1_macro": macro}


def compute_metrics(logits: np.ndarray, targets: np.ndarray, multi_label: bool) -> dict[str, float]:
    return multi_label_metrics(logits, targets) if multi_label else single_label_metrics(logits, targets)


def primary_metric(multi_label: bool) -> str:
    """The metric model selection and early stopping follow."""
    return "f1_micro" if multi_label else "accuracy"
