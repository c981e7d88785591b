"""Paged attention plugged into transformers' AttentionInterface.

The model runner packs every sequence of a step into one [1, T] row (decode tokens first, then prefill chunks)
and publishes a `StepContext` here before the forward pass; each attention layer writes the new keys/values into
the engine's KV cache and attends over each sequence's own cached context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "splitserve_paged"


@dataclass
class PrefillChunk:
    query_start: int            # offset of the chunk in the packed row
    query_end: int
    cached_len: int             # tokens of this sequence already in the KV cache before this chunk
    context_slots: torch.Tensor | None   # cache slots of all cached_len + chunk tokens; None when cached_len == 0
    mask: torch.Tensor | None = None     # [n, len(context_slots)] True where attended; None: causal


@dataclass
class StepContext:
    k_cache: list[torch.Tensor]          # per layer: [kv_heads, num_slots, head_dim]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor           # [T]: where each new token's key/value goes
    num_decode: int                      # the first num_decode tokens are single-token decodes
    decode_slots: torch.Tensor | None    # [num_decode, max_len] cache slots of each decode's context (padded)
    decode_mask: torch.Tensor | None     # [1, num_decode, 1, max_len] True where attended; None if no padding
    prefills: list[PrefillChunk]
    decode_lengths: torch.Tensor | None = None   # [num_decode] context length of each decode (the unpadded slots)


_context: StepContext | None = None


def set_step_context(context: StepContext | None) -> None:
    global _context
    _context = context


def current_step() -> StepContext:
    assert _context is not None, "a forward pass outside an engine step"
    return _context


def _decode_attention(groups: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """query [B, H, D], key/value [Hkv, B, L, D] -> [B, H, D].

    One query token per sequence: two batched matmuls (over heads x sequences) and a softmax, with the heads that
    share a key/value head folded together. On CPUs this is several times faster than SDPA's flash kernel, built
    for long queries; the gathered keys/values are used in the cache's own layout, without a copy.
    """
    batch, heads, dim = query.shape
    kv_heads = key.shape[0]
    # fp32 math: CPU batched matmuls in bf16 fall back to one small product per (sequence, head).
    q = query.reshape(batch, kv_heads, groups, dim).transpose(0, 1).float()          # [Hkv, B, G, D]
    scores = torch.matmul(q, key.float().transpose(-1, -2))                          # [Hkv, B, G, L]
    scores = scores * (scaling if scaling is not None else dim ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                           # mask [1, B, 1, L]
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())                 # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(batch, heads, dim).to(query.dtype)


def paged_attention_core(layer: int, groups: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
    """query [T, H, D], key/value [T, Hkv, D] for the step's new tokens -> attention output [T, H, D]."""
    ctx = current_step()
    k_cache, v_cache = ctx.k_cache[layer], ctx.v_cache[layer]
    k_cache.index_copy_(1, ctx.slot_mapping, key.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, ctx.slot_mapping, value.transpose(0, 1).to(v_cache.dtype))
    outputs: list[torch.Tensor] = []
    if ctx.num_decode:
        batch, length = ctx.decode_slots.shape
        flat = ctx.decode_slots.view(-1)
        k = k_cache.index_select(1, flat).view(k_cache.shape[0], batch, length, k_cache.shape[2])
        v = v_cache.index_select(1, flat).view(v_cache.shape[0], batch, length, v_cache.shape[2])
        outputs.append(_decode_attention(groups, query[: ctx.num_decode], k, v, ctx.decode_mask, scaling))
    for chunk in ctx.prefills:
        q = query[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)          # [1, H, n, D]
        if chunk.context_slots is None:
            k = key[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)
            v = value[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scaling,
                                                 enable_gqa=groups > 1)
        else:
            k = k_cache.index_select(1, chunk.context_slots).unsqueeze(0)                   # [1, Hkv, L, D]
            v = v_cache.index_select(1, chunk.context_slots).unsqueeze(0)
            n, total = q.shape[2], k.shape[2]
            mask = chunk.mask
            if mask is None:
                rows = torch.arange(n, device=q.device).unsqueeze(1) + chunk.cached_len
                mask = torch.arange(total, device=q.device).unsqueeze(0) <= rows  # [n, L]
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling)
        outputs.append(out[0].transpose(0, 1))                                   # [n, H, D]
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    out = paged_attention_core(module.layer_idx, getattr(module, "num_key_value_groups", 1),
                               query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling)
    return out.unsqueeze(0), None


def _no_mask(*args: object, **kwargs: object) -> None:
    """Masks are built per sequence inside paged_attention; the model must not build a [T, T] one."""
    return None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
