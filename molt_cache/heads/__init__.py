"""Stage-two heads: the MoLT layer (molt.py), factorized bilinear pooling (fbp.py), the fusion
(fusion.py), and the assembled MoltHeads / BaselineHeads (model.py). docs/heads.md has the
equations with shapes."""
from molt_cache.heads.model import (
    ABLATIONS,
    MISSING_STRATEGIES,
    MODELS,
    BaselineHeads,
    CommonStates,
    FeatureDims,
    HeadsOutput,
    MoltHeads,
    UnimodalHeads,
    build_heads,
)

__all__ = ["ABLATIONS", "MISSING_STRATEGIES", "MODELS", "BaselineHeads", "CommonStates",
           "FeatureDims", "HeadsOutput", "MoltHeads", "UnimodalHeads", "build_heads"]
