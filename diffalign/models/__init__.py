"""Embedded models (``gmm``, ``digits``, ``digits-cond``, ``digits-clips``), ``load_model`` and the model adapters."""

from .loading import EMBEDDED, ModelSpec, load_model

__all__ = ["EMBEDDED", "ModelSpec", "load_model"]
