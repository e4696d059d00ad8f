import numpy as np
import pytest

from molt_cache.metrics import compute_metrics, multi_label_metrics, primary_metric


def f1_reference(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Plain-loop F1 in float64, written independently of the vectorized code."""
    tp = fp = fn = 0
    per_label = []
    for c in range(true.shape[1]):
        t = f = n = 0
        for i in range(true.shape[0]):
            if pred[i, c] and true[i, c]:
                t += 1
            elif pred[i, c]:
                f += 1
            elif true[i, c]:
                n += 1
        tp, fp, fn = tp + t, fp + f, fn + n
        if 2 * t + f + n:
            per_label.append(2 * t / (2 * t + f + n))
    return 2 * tp / (2 * tp + fp + fn), float(np.mean(per_label))


def test_accuracy_counts_argmax():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    got = compute_metrics(logits, np.array([0, 1, 1]), multi_label=False)
    assert got["accuracy"] == pytest.approx(2 / 3)
    # class 0: TP 1, FP 1 (pair 2), FN 0 -> 2/3; class 1: TP 1, FP 0, FN 1 -> 2/3
    assert got["f1_macro"] == pytest.approx(2 / 3)


def test_single_label_macro_f1_matches_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(80, 6))
    targets = rng.integers(0, 5, size=80)  # class 5 never a target; predicted sometimes
    logits[:, 4] = -9.0  # class 4: a target, never predicted (F1 0, still counted)
    pred = logits.argmax(1)
    one_hot = np.eye(6, dtype=bool)
    _, macro = f1_reference(one_hot[pred], one_hot[targets])
    got = compute_metrics(logits, targets, multi_label=False)
    assert got["f1_macro"] == pytest.approx(macro)
    assert got["accuracy"] == pytest.approx(float(np.mean(pred == targets)))


def test_multi_label_f1_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    targets = (rng.random((50, 7)) < 0.3).astype(np.uint8)
    targets[:, 6] = 0
    logits[:, 6] = -1.0  # a label absent from targets and predictions is left out of macro F1
    micro, macro = f1_reference(logits > 0, targets.astype(bool))
    got = multi_label_metrics(logits, targets)
    assert got["f1_micro"] == pytest.approx(micro)
    assert got["f1_macro"] == pytest.approx(macro)


def test_threshold_is_half_probability():
    # sigmoid(0) = 0.5 is not above the threshold: a logit of exactly 0 predicts negative
    got = multi_label_metrics(np.array([[0.0, 1e-6]]), np.array([[1, 1]]))
    assert got["f1_micro"] == pytest.approx(2 / 3)


def test_primary_metric():
    assert primary_metric(True) == "f1_micro" and primary_metric(False) == "accuracy"
