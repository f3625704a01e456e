"""Attention processors for diffusers' ``Attention`` layers, with a pluggable kernel and optionally fused projections.

They follow diffusers' processor contract, ``processor(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None)``, step for step as ``AttnProcessor2_0`` (self and cross attention, (B, L, C) or
(B, C, H, W) inputs, spatial norm, group norm, cross-attention norm, q/k norms, residual connection, output rescale)
and ``AttnAddedKVProcessor2_0`` (extra key/value projections of the encoder states, concatenated in front of the
self-attention keys), and reuse the ``Attention`` module's own helpers (``prepare_attention_mask``,
``norm_encoder_hidden_states``, ``head_to_batch_dim``). Only two steps differ:

- the attention itself, softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1), runs through the kernel
  given (``attention.SDPAKernel`` with an explicit torch kernel, or ``attention.XFormersKernel``);
- with ``fuse_projections=True`` the query, key and value projections that read the same input run as one matmul
  over their concatenated weights (W_q; W_k; W_v), and the output is split. The weights are concatenated at call
  time from the layer's own ``to_q`` / ``to_k`` / ``to_v``, so gradients reach those parameters and the state dict is
  unchanged (diffusers' ``fuse_qkv_projections`` adds a separate ``to_qkv`` layer instead, which training would update
  in place of ``to_q``...). Under ``torch.no_grad`` the concatenation is cached until a weight is replaced or changed
  in place (optimizer steps, ``load_state_dict``); edits through ``weight.data`` bypass autograd's version counter, so
  after those call ``set_attention_backend`` again. Projections that are not plain ``nn.Linear`` (e.g. peft LoRA
  layers) run unfused, so adapters keep working and train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import SDPAKernel, XFormersKernel

Kernel = SDPAKernel | XFormersKernel


def _fusable(layers: list[nn.Module]) -> bool:
    """Plain linear layers with the same input width and all or none biased: their matmuls can be one."""
    if not all(type(layer) is nn.Linear for layer in layers):
        return False
    return len({layer.in_features for layer in layers}) == 1 and len({layer.bias is None for layer in layers}) == 1


class DiffalignAttnProcessor:
    """``AttnProcessor2_0`` / ``AttnAddedKVProcessor2_0`` with a chosen attention kernel and optional fused QKV.

    One instance serves one ``Attention`` layer (it caches that layer's fused weights for inference).
    """

    def __init__(self, kernel: Kernel, fuse_projections: bool = False):
        self.kernel = kernel
        self.fuse_projections = fuse_projections
        self._fused_cache: dict[tuple[str, ...], tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    @property
    def name(self) -> str:
        """The backend name that builds this processor (``sdpa:flash``, ``fused``, ``xformers``...)."""
        if not self.fuse_projections:
            return self.kernel.name
        return "fused" + self.kernel.name.removeprefix("sdpa")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def project(self, attn: Attention, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The projections ``names`` (e.g. ``("to_q", "to_k", "to_v")``) of ``x`` (B, L, C_in): one matmul if fused."""
        layers = [getattr(attn, name) for name in names]
        if not self.fuse_projections or not _fusable(layers):
            return tuple(layer(x) for layer in layers)
        weight, bias = self._fused_weights(names, layers)
        return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)

    def _fused_weights(self, names: tuple[str, ...], layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q; W_k; W_v) and its bias; cached under ``no_grad`` until a weight is replaced or updated in place."""
        params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        if torch.is_grad_enabled():
            self._fused_cache.pop(names, None)
        else:
            version = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
            cached = self._fused_cache.get(names)
            if cached is not None and cached[0] == version:
                return cached[1], cached[2]
        weight = torch.cat([layer.weight for layer in layers])  # (sum C_out, C_in)
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        if not torch.is_grad_enabled():
            self._fused_cache[names] = (version, weight, bias)
        return weight, bias

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attn.added_kv_proj_dim is not None:
            return self._added_kv(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # (B, H, ., Lk)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            query, key, value = self.project(attn, hidden_states, ("to_q", "to_k", "to_v"))
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            key, value = self.project(attn, encoder_hidden_states, ("to_k", "to_v"))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lq, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lk, D)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lk, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.kernel(query, key, value, attention_mask, attn.scale)  # (B, H, Lq, D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _added_kv(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``AttnAddedKVProcessor2_0``: keys / values of the encoder states (``add_k_proj``, ``add_v_proj``) first."""
        residual = hidden_states  # (B, C, H, W) or (B, C, L)
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape  # (B, L, C)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size, out_dim=4)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if attn.only_cross_attention:
            query = attn.to_q(hidden_states)
        else:
            query, self_key, self_value = self.project(attn, hidden_states, ("to_q", "to_k", "to_v"))
        key, value = self.project(attn, encoder_hidden_states, ("add_k_proj", "add_v_proj"))
        query = attn.head_to_batch_dim(query, out_dim=4)  # (B, H, L, D)
        key = attn.head_to_batch_dim(key, out_dim=4)  # (B, H, L_enc, D)
        value = attn.head_to_batch_dim(value, out_dim=4)
        if not attn.only_cross_attention:  # (B, H, L_enc + L, D)
            key = torch.cat([key, attn.head_to_batch_dim(self_key, out_dim=4)], dim=2)
            value = torch.cat([value, attn.head_to_batch_dim(self_value, out_dim=4)], dim=2)
        hidden_states = self.kernel(query, key, value, attention_mask, attn.scale)  # (B, H, L, D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, residual.shape[1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual
