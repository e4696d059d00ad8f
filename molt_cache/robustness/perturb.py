"""Moved to `molt_cache.perturb` (training uses the perturbations as much as robustness does).
Re-exported here so code written against the old path keeps importing."""
from molt_cache.perturb import (BOTH_IMAGE_SHARE, MISSING_TYPES, MODALITIES, NOISE_ON, STRATEGIES,
                                MissingTable, gaussian_noise, make_perturb, missing, sample_generator)

__all__ = ["BOTH_IMAGE_SHARE", "MISSING_TYPES", "MODALITIES", "NOISE_ON", "STRATEGIES", "MissingTable",
           "gaussian_noise", "make_perturb", "missing", "sample_generator"]
