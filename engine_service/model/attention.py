"""Paged attention plugged into transformers' AttentionInterface.

The model runner packs every sequence of a step into one [1, T] row (decode tokens first, then prefill chunks)
and publishes a `StepContext` here before the forward pass; each attention layer writes the new keys/values into
the engine's KV cache and attends over each sequence's own cached context.

Each layer applies its own options as transformers passes them: `sliding_window` (Mistral, Qwen2's
`use_sliding_window`, Gemma2's local layers: a query at position p sees keys at positions p - window < j <= p) and
`softcap` (Gemma2: scores -> softcap * tanh(scores / softcap) before the softmax).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine_service.model import paged_decode

ATTENTION_NAME = "splitserve_paged"


@dataclass
class PrefillChunk:
    query_start: int            # offset of the chunk in the packed row
    query_end: int
    cached_len: int             # tokens of this sequence already in the KV cache before this chunk
    context_slots: torch.Tensor | None   # cache slots of all cached_len + chunk tokens; None when cached_len == 0
    mask: torch.Tensor | None = None     # [n, len(context_slots)] True where attended; None: causal
    offsets: torch.Tensor | None = None  # a tree's rows: position - cached_len of each; None: contiguous rows


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
    # GPUs: each decode row's block table [num_decode, W] (on the device, with decode_lengths there too); the
    # paged_decode kernel reads the cache in place through it, and decode_slots/decode_mask are not built.
    decode_tables: torch.Tensor | None = None
    block_size: int = 0


# Per thread: each engine's step loop runs its forward passes on its own thread, and two engines in one process
# (a prefill and a decode engine in the tests) must not see each other's step.
_steps = threading.local()


def set_step_context(context: StepContext | None) -> None:
    _steps.context = context


def current_step() -> StepContext:
    context = getattr(_steps, "context", None)
    assert context is not None, "a forward pass outside an engine step"
    return context


def _soft_capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _decode_attention(groups: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, scaling: float | None, softcap: float | None) -> torch.Tensor:
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
    scores = _soft_capped(scores * (scaling if scaling is not None else dim ** -0.5), softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                           # mask [1, B, 1, L]
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())                 # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(batch, heads, dim).to(query.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, mask: torch.Tensor | None,
            scaling: float | None, softcap: float | None) -> torch.Tensor:
    """q [1, H, n, D], k/v [1, Hkv, L, D], mask [n, L] True where attended (None: causal) -> [1, H, n, D].
    SDPA where it can; written out when the scores are soft-capped (SDPA has no such option)."""
    if mask is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scaling,
                                              enable_gqa=groups > 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = _soft_capped(torch.matmul(q, k.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5), softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def paged_attention_core(layer: int, groups: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float | None, sliding_window: int | None = None,
                         softcap: float | None = None, cache_written: bool = False) -> torch.Tensor:
    """query [T, H, D], key/value [T, Hkv, D] for the step's new tokens -> attention output [T, H, D].
    cache_written: the caller already wrote key/value to their slots (fused_ops.rotary_and_cache)."""
    ctx = current_step()
    k_cache, v_cache = ctx.k_cache[layer], ctx.v_cache[layer]
    if not cache_written:
        k_cache.index_copy_(1, ctx.slot_mapping, key.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, ctx.slot_mapping, value.transpose(0, 1).to(v_cache.dtype))
    device = query.device
    outputs: list[torch.Tensor] = []
    if ctx.num_decode and ctx.decode_tables is not None:
        assert sliding_window is None and softcap is None, "the paged decode kernel has no window or softcap"
        outputs.append(paged_decode.paged_decode_attention(
            query[: ctx.num_decode], k_cache, v_cache, ctx.decode_tables, ctx.decode_lengths, ctx.block_size,
            scaling if scaling is not None else query.shape[-1] ** -0.5))
    elif ctx.num_decode:
        batch, length = ctx.decode_slots.shape
        flat = ctx.decode_slots.view(-1)
        k = k_cache.index_select(1, flat).view(k_cache.shape[0], batch, length, k_cache.shape[2])
        v = v_cache.index_select(1, flat).view(v_cache.shape[0], batch, length, v_cache.shape[2])
        mask = ctx.decode_mask
        if sliding_window is not None:   # each decode's query sits at position length - 1 of its context
            first = ctx.decode_lengths.to(device) - sliding_window
            inside = (torch.arange(length, device=device).unsqueeze(0) >= first.unsqueeze(1)).view(1, batch, 1, length)
            mask = inside if mask is None else mask & inside
        outputs.append(_decode_attention(groups, query[: ctx.num_decode], k, v, mask, scaling, softcap))
    for chunk in ctx.prefills:
        q = query[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)          # [1, H, n, D]
        n = q.shape[2]
        if chunk.context_slots is None:
            k = key[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)
            v = value[chunk.query_start: chunk.query_end].transpose(0, 1).unsqueeze(0)
        else:
            k = k_cache.index_select(1, chunk.context_slots).unsqueeze(0).to(q.dtype)      # [1, Hkv, L, D]
            v = v_cache.index_select(1, chunk.context_slots).unsqueeze(0).to(q.dtype)
        mask = chunk.mask
        if chunk.context_slots is not None or sliding_window is not None:
            # Positions of the queries and of the keys (the cached context, then the queries themselves).
            offsets = chunk.offsets if chunk.offsets is not None else torch.arange(n, device=device)
            query_positions = offsets + chunk.cached_len
            key_positions = torch.cat([torch.arange(chunk.cached_len, device=device), query_positions])
            if mask is None:
                mask = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)                 # [n, L]
            if sliding_window is not None:
                mask = mask & (key_positions.unsqueeze(0) > query_positions.unsqueeze(1) - sliding_window)
        out = _attend(q, k, v, groups, mask, scaling, softcap)
        outputs.append(out[0].transpose(0, 1))                                   # [n, H, D]
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    out = paged_attention_core(module.layer_idx, getattr(module, "num_key_value_groups", 1),
                               query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling,
                               kwargs.get("sliding_window"), kwargs.get("softcap"))
    return out.unsqueeze(0), None


def _no_mask(*args: object, **kwargs: object) -> None:
    """Masks are built per sequence inside paged_attention; the model must not build a [T, T] one."""
    return None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
