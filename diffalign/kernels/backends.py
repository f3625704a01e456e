"""``set_attention_backend``: one switch for the attention of every diffusers ``Attention`` layer in a model.

Backend names (``backend_names()`` lists them all):

========================  ==================================================================================
``default``               the processors the model had before the first switch (diffusers' ``AttnProcessor2_0``)
``sdpa``                  torch ``scaled_dot_product_attention``, torch picks the kernel
``sdpa:<kernel>``         the same, restricted to one kernel: ``flash``, ``efficient``, ``cudnn`` or ``math``
``xformers``              xformers ``memory_efficient_attention`` (when installed)
``fused`` / ``fused:<k>`` fused QKV (and cross-attention KV) projections, plus ``sdpa`` / ``sdpa:<k>`` attention
========================  ==================================================================================

A backend that cannot run where it is asked to (xformers not installed; ``efficient`` or ``cudnn`` on CPU; flash
attention in float32 on CUDA...) falls back to torch's own SDPA choice with one warning; nothing here fails at import
time for want of xformers, Triton or CUDA.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnAddedKVProcessor,
    SlicedAttnProcessor,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
)
from torch import nn

from .attention import SDPA_KERNELS, SDPAKernel, XFormersKernel, warn_once, xformers_installed
from .processors import DiffalignAttnProcessor

FAMILIES = ("default", "sdpa", "xformers", "fused")
REPLACEABLE = (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    SlicedAttnAddedKVProcessor,
    XFormersAttnAddedKVProcessor,
    DiffalignAttnProcessor,
)
"""Processors computing plain (or added-KV) attention, which ours reproduce; others (IP-Adapter...) are kept."""

_DEFAULTS_ATTR = "_diffalign_default_processors"
_BACKEND_ATTR = "_diffalign_attention_backend"


def backend_names() -> list[str]:
    """Every name ``set_attention_backend`` accepts."""
    kernels = sorted(SDPA_KERNELS)
    return ["default", "sdpa", *(f"sdpa:{k}" for k in kernels), "xformers", "fused", *(f"fused:{k}" for k in kernels)]


def parse_backend(name: str) -> tuple[str, str | None]:
    """``"sdpa:flash"`` -> ``("sdpa", "flash")``; ``"fused"`` -> ``("fused", None)``; a clear error otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"attention backend must be a str such as 'sdpa' or 'fused', got {type(name).__name__}.")
    family, _, kernel = name.strip().lower().partition(":")
    if family not in FAMILIES or (kernel and (family not in ("sdpa", "fused") or kernel not in SDPA_KERNELS)):
        raise ValueError(f"unknown attention backend {name!r}; expected one of {backend_names()}.")
    return family, kernel or None


def make_processor(name: str) -> DiffalignAttnProcessor | None:
    """A fresh processor for backend ``name`` (None for ``default``, which restores the model's own processors)."""
    family, kernel = parse_backend(name)
    if family == "default":
        return None
    if family == "xformers":
        if xformers_installed():
            return DiffalignAttnProcessor(XFormersKernel())
        warn_once(("xformers", "missing"), "xformers is not installed; attention backend 'xformers' uses 'sdpa'.")
        return DiffalignAttnProcessor(SDPAKernel())
    return DiffalignAttnProcessor(SDPAKernel(kernel), fuse_projections=family == "fused")


def attention_models(pipe_or_model) -> list[nn.Module]:
    """The models to patch: the model itself, or every component of a pipeline that has diffusers attention."""
    if isinstance(pipe_or_model, nn.Module):
        models = [pipe_or_model]
    elif isinstance(getattr(pipe_or_model, "components", None), dict):
        models = [c for c in pipe_or_model.components.values() if isinstance(c, nn.Module)]
    else:
        raise TypeError(
            f"set_attention_backend takes a diffusers pipeline or a torch model (a UNet), got "
            f"{type(pipe_or_model).__name__}."
        )
    models = [m for m in models if any(isinstance(layer, Attention) for layer in m.modules())]
    if not models:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no diffusers Attention layers; pass a UNet (or a pipeline that has "
            "one), e.g. pipe.unet."
        )
    return models


def _set_on_model(model: nn.Module, name: str) -> int:
    """Patch one model's ``Attention`` layers; the first switch records their processors for ``default``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    defaults = model.__dict__.get(_DEFAULTS_ATTR)
    if parse_backend(name)[0] == "default":
        if defaults is not None:
            for n, processor in defaults.items():
                layers[n].set_processor(processor)
            del model.__dict__[_DEFAULTS_ATTR]
        model.__dict__[_BACKEND_ATTR] = "default"
        return len(layers)
    if defaults is None:
        defaults = {n: layer.processor for n, layer in layers.items()}
        model.__dict__[_DEFAULTS_ATTR] = defaults
    patched, kept = 0, set()
    for n, layer in layers.items():
        if not isinstance(defaults[n], REPLACEABLE):
            kept.add(type(defaults[n]).__name__)
            continue
        layer.set_processor(make_processor(name))
        patched += 1
    if kept:
        warn_once(
            ("kept", *sorted(kept)),
            f"attention layers with processors {sorted(kept)} keep them; backend {name!r} replaces only plain "
            "attention processors.",
        )
    model.__dict__[_BACKEND_ATTR] = name
    return patched


def set_attention_backend(pipe_or_unet, name: str = "default") -> int:
    """Set attention backend ``name`` on every diffusers ``Attention`` layer of a model or pipeline.

    ``pipe_or_unet``: a diffusers pipeline (its UNet, VAE and any other component with attention are patched) or a
    model (``UNet2DConditionModel``, ``UNet2DModel``...). Names are those of ``backend_names()``; ``"default"`` puts
    back the processors the model had before its first switch, so outputs are exactly what they were. Returns the
    number of layers now on the requested backend.
    """
    parse_backend(name)
    return sum(_set_on_model(model, name) for model in attention_models(pipe_or_unet))


def get_attention_backend(model: nn.Module) -> str:
    """The backend last set on ``model`` with ``set_attention_backend`` (``"default"`` if never)."""
    return model.__dict__.get(_BACKEND_ATTR, "default")


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether backend ``name`` runs natively (without falling back) on a small input on ``device`` in ``dtype``."""
    family, kernel = parse_backend(name)
    if family == "default" or (family != "xformers" and kernel is None):
        return True
    query = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)  # (B, H, L, D)
    try:
        if family == "xformers":
            if not xformers_installed():
                return False
            XFormersKernel._xformers(query, query, query, None, 0.125)
        else:
            with torch.nn.attention.sdpa_kernel(SDPA_KERNELS[kernel]):
                torch.nn.functional.scaled_dot_product_attention(query, query, query)
    except (RuntimeError, NotImplementedError, ImportError):
        return False
    return True


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> list[str]:
    """The backend names that run natively on ``device`` for ``dtype`` inputs, found by running each once.

    ``dtype`` defaults to float16 on CUDA and float32 elsewhere. Unlisted names still work, through the fallback.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return [name for name in backend_names() if _probe(name, device, dtype)]
