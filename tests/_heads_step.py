"""One training step of heads on a batch, and the comparison of two such steps: the exactness
tests of a faster path against the one it replaces (tests/test_image_once.py: image-once vs
per-pair; tests/test_text_packing.py: real text tokens only vs padded)."""
from typing import Callable

import torch

from molt_cache.losses.task import task_loss


def step(heads, batch, strategy="zero"):
    """Forward, task loss + 0.1 · CCA loss, backward: (HeadsOutput, {parameter name: gradient})."""
    heads.zero_grad(set_to_none=True)
    out = heads(batch, missing_strategy=strategy)
    loss = task_loss(out.logits, batch.targets, False)
    if out.cca_loss is not None:
        loss = loss + 0.1 * out.cca_loss
    loss.backward()
    return out, {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}


def assert_same_step(fast, fast_grads, ref, ref_grads, *, tol: float, grad_atol: Callable[[float], float]):
    """Logits, CCA loss and every layer's common states within `tol`; every parameter gradient
    within grad_atol(its reference's largest magnitude)."""
    torch.testing.assert_close(fast.logits, ref.logits, rtol=tol, atol=tol)
    if ref.cca_loss is not None:
        torch.testing.assert_close(fast.cca_loss, ref.cca_loss, rtol=tol, atol=tol)
    for a, b in zip(fast.common, ref.common):
        for f in ("image", "text", "image_proj", "text_proj"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=tol, atol=tol)
    assert fast_grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=0, atol=grad_atol(scale), msg=name)
