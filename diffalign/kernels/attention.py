"""Attention kernels: softmax(q k^T * scale + mask) v through torch SDPA with an explicit kernel, or xformers.

Every kernel here takes query (B, H, Lq, D), key and value (B, H, Lk, D), an additive float mask broadcastable to
(B, H, Lq, Lk) or None, and the softmax scale, and returns (B, H, Lq, D). Nothing here imports xformers or touches
CUDA at import time: a kernel that cannot run on the inputs it is given (a GPU-only kernel on CPU, flash attention in
float32 or with a mask, xformers not installed) falls back to torch's own SDPA choice and says so in one warning per
kernel and reason for the whole process.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 (CUDA), and torch's flash kernel for CPU
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # memory-efficient attention (xformers' cutlass kernel, CUDA)
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN fused attention (CUDA)
    "math": SDPBackend.MATH,  # the reference composite: matmul, softmax, matmul
}
"""Kernel names accepted after ``sdpa:`` / ``fused:``, as torch's ``SDPBackend`` values."""

_NO_KERNEL_MESSAGES = ("No viable backend", "No available kernel")
_warned: set[tuple] = set()


def warn_once(key: tuple, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process, nothing afterwards."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def xformers_installed() -> bool:
    """Whether ``xformers`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("xformers") is not None


class SDPAKernel:
    """``F.scaled_dot_product_attention`` restricted to one torch kernel (``sdpa_kernel``), or torch's own choice.

    ``kernel=None`` leaves the choice to torch, as diffusers' ``AttnProcessor2_0`` does. A named kernel that has no
    implementation for the inputs' device, dtype, head size or mask falls back to torch's choice for those inputs,
    with one warning; the outcome is remembered per (device, dtype, masked, head size), so the failed attempt costs
    one exception per input kind, not one per call.
    """

    def __init__(self, kernel: str | None = None):
        if kernel is not None and kernel not in SDPA_KERNELS:
            raise ValueError(f"unknown SDPA kernel {kernel!r}; expected one of {sorted(SDPA_KERNELS)} or None.")
        self.kernel = kernel
        self._unsupported: set[tuple] = set()

    @property
    def name(self) -> str:
        return "sdpa" if self.kernel is None else f"sdpa:{self.kernel}"

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        if self.kernel is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        kind = (query.device.type, query.dtype, mask is not None, query.shape[-1])
        if kind not in self._unsupported:
            try:
                with sdpa_kernel(SDPA_KERNELS[self.kernel]):
                    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
            except RuntimeError as error:
                if not any(m in str(error) for m in _NO_KERNEL_MESSAGES):
                    raise
                self._unsupported.add(kind)
                device, dtype, masked, head_dim = kind
                warn_once(
                    ("sdpa", self.kernel, *kind),
                    f"attention backend {self.name!r} has no kernel for {device} {dtype} inputs "
                    f"(head size {head_dim}, {'with' if masked else 'no'} attention mask); using torch's default "
                    "SDPA choice for these inputs instead.",
                )
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


class XFormersKernel:
    """xformers' ``memory_efficient_attention``; torch's SDPA with one warning for inputs it has no operator for.

    xformers is imported at the first call, never at import time; ``set_attention_backend`` only builds this kernel
    when xformers is installed.
    """

    name = "xformers"

    def __init__(self):
        self._fallback = SDPAKernel()
        self._unsupported: set[tuple] = set()

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        kind = (query.device.type, query.dtype, mask is not None, query.shape[-1])
        if kind not in self._unsupported:
            try:
                return self._xformers(query, key, value, mask, scale)
            except NotImplementedError:  # xformers: "No operator found for memory_efficient_attention_forward"
                self._unsupported.add(kind)
                device, dtype, masked, head_dim = kind
                warn_once(
                    ("xformers", *kind),
                    f"xformers has no attention operator for {device} {dtype} inputs (head size {head_dim}, "
                    f"{'with' if masked else 'no'} attention mask); using torch's default SDPA choice instead.",
                )
        return self._fallback(query, key, value, mask, scale)

    @staticmethod
    def _xformers(query, key, value, mask, scale) -> torch.Tensor:
        import xformers.ops

        B, H, Lq, _ = query.shape
        Lk = key.shape[2]
        bias = None
        if mask is not None:  # xformers wants a float (B, H, Lq, Lk) bias whose rows start on 8-element boundaries
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill(~mask, float("-inf"))
            padded = torch.empty(B, H, Lq, -(-Lk // 8) * 8, dtype=query.dtype, device=query.device)
            bias = padded[..., :Lk]
            bias.copy_(mask.expand(B, H, Lq, Lk))
        out = xformers.ops.memory_efficient_attention(  # (B, L, H, D) layout in and out
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)  # (B, H, Lq, D)
