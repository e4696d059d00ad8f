"""molt-cache: robust image-text classification with frozen large models, as a two-stage
feature-cache pipeline (MoLT: "Robust Latent Representation Tuning for Image-text Classification")."""

__version__ = "0.1.0"

__all__ = ["Classifier", "__version__"]


def __getattr__(name: str):
    # `from molt_cache import Classifier` without importing torch and the encoders on `import molt_cache`
    if name == "Classifier":
        from molt_cache.predict import Classifier

        return Classifier
    raise AttributeError(f"module 'molt_cache' has no attribute {name!r}")
