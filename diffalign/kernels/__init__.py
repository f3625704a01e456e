"""Attention backends for the diffusers models diffalign samples and trains: one switch, clean CPU fallbacks.

``set_attention_backend(pipe_or_unet, "sdpa:flash" | "fused" | "xformers" | "default" | ...)`` swaps the processor of
every diffusers ``Attention`` layer; ``available_backends(device)`` lists what runs natively there. Importing this
package needs neither xformers, Triton nor CUDA.
"""

from .backends import available_backends, backend_names, get_attention_backend, set_attention_backend
from .processors import DiffalignAttnProcessor

__all__ = [
    "DiffalignAttnProcessor",
    "available_backends",
    "backend_names",
    "get_attention_backend",
    "set_attention_backend",
]
