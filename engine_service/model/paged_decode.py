"""Decode attention on GPUs: one Triton kernel that reads each sequence's keys/values where they lie in the paged
cache (through its block table), with no gather into a padded copy first.

One program per (sequence, key/value head) serves all the query heads that share that key/value head (GQA): it
walks the sequence's context in tiles of BLOCK_N tokens, finds each token's slot from the block table, and keeps
an online softmax (running max and sum, as flash attention does). Scores, softmax and the weighted sum are fp32;
the products are fp32 too ("ieee": exact products, no TF32 rounding), so the kernel computes what the batched
matmuls of attention._decode_attention compute, in another summation order. It is bound by reading the cache,
and its loop bound is read on the device: one launch serves every context length, so a CUDA graph can hold it.

Triton is imported on first use: CPU-only installs need not have it (TRITON_INTERPRET=1 runs the kernel on the CPU
for tests where Triton is installed).
"""
from __future__ import annotations

import functools
import os

import torch

BLOCK_N = 64   # context tokens per tile


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on `device`: Triton importable, and a CUDA device (or the
    interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lengths_ptr,
                     q_stride_row, q_stride_head, cache_stride_head, table_stride, out_stride_row, out_stride_head,
                     scale,
                     GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lengths_ptr + row)
        group = tl.arange(0, GROUPS_PAD)
        dim = tl.arange(0, DIM_PAD)
        token = tl.arange(0, TILE)
        group_ok = group < GROUPS
        dim_ok = dim < HEAD_DIM
        heads = kv_head * GROUPS + group
        q = tl.load(q_ptr + row * q_stride_row + heads[:, None] * q_stride_head + dim[None, :],
                    mask=group_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        best = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, DIM_PAD], tl.float32)
        cache_base = kv_head.to(tl.int64) * cache_stride_head
        for start in range(0, length, TILE):
            position = start + token
            valid = position < length
            block = tl.load(tables_ptr + row * table_stride + position // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + position % BLOCK_SIZE
            offsets = cache_base + slot[:, None] * HEAD_DIM + dim[None, :]
            load_ok = valid[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + offsets, mask=load_ok, other=0.0).to(tl.float32)             # [TILE, DIM]
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale                   # [GROUPS, TILE]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, axis=1)
            v = tl.load(v_ptr + offsets, mask=load_ok, other=0.0).to(tl.float32)
            acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + row * out_stride_row + heads[:, None] * out_stride_head + dim[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=group_ok[:, None] & dim_ok[None, :])

    return paged_decode


def _pad(n: int) -> int:
    """Triton's tile sizes: powers of two, at least 16 (tl.dot's smallest)."""
    import triton
    return max(16, triton.next_power_of_2(n))


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, block_size: int, scale: float, tile: int = BLOCK_N,
                           num_warps: int = 4) -> torch.Tensor:
    """query [B, H, D]; k_cache/v_cache [Hkv, slots, D] (contiguous); tables [B, W] block ids; lengths [B] context
    length of each row (its own token included, already in the cache) -> [B, H, D] in query's dtype."""
    rows, heads, head_dim = query.shape
    kv_heads = k_cache.shape[0]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2] == head_dim
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty(rows, heads, head_dim, dtype=query.dtype, device=query.device)
    groups = heads // kv_heads
    _kernel()[(rows, kv_heads)](
        query, k_cache, v_cache, out, tables, lengths,
        query.stride(0), query.stride(1), k_cache.stride(0), tables.stride(0), out.stride(0), out.stride(1),
        scale, GROUPS=groups, GROUPS_PAD=_pad(groups), HEAD_DIM=head_dim, DIM_PAD=_pad(head_dim),
        BLOCK_SIZE=block_size, TILE=tile, num_warps=num_warps)
    return out
