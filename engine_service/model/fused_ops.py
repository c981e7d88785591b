"""The Llama layer's small operations fused into single Triton kernels, for GPUs.

Eager PyTorch spends a dozen kernels of a layer on RMSNorm (upcast, square, mean, rsqrt, scale, downcast, weight),
rotary embedding (slices, negation, concatenation, products, sum), the KV-cache writes and SiLU-times-up; each is a
launch of a few microseconds that reads and writes the whole activation. At one decode row a step is mostly those
launches, and at a 2,048-token prefill their memory traffic is a tenth of the step. Here each becomes one kernel:
- add_rms_norm: the residual add and the next RMSNorm (one row per program);
- rotary_and_cache: q and k rotated, k and v written to their cache slots (one head of one token per program);
- silu_and_mul: SiLU(gate) * up.
Each rounds where transformers' own modules round (bf16 after every op, as eager PyTorch does; no multiply-add
contracted into an FMA; CUDA's expf in SiLU), so the results are those of the eager operations up to the order of
the fp32 sums in the RMSNorm mean.

On by default on GPUs (`--fused-gpu-ops`): on an H200, tests/unit/test_cuda.py's equality test passes (rotary and
cache writes bit for bit, RMSNorm within a step of the dtype), graph-replayed fp32 greedy with them is
token-identical to generate, and a 1B-shaped model's batch-1 step drops from 2.2 to 1.4 ms (bench/cuda.py).
"""
from __future__ import annotations

import functools

import os

import torch

# Each product and sum rounded on its own, as eager torch's separate kernels round: no contraction of a multiply
# and an add into one FMA (the GPU compiler's default).
EXACT = {"enable_fp_fusion": False}


@functools.cache
def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def add_rms_norm(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, width, eps,
                     HAS_DELTA: tl.constexpr, WIDTH_PAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, WIDTH_PAD)
        ok = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=ok, other=0.0)
        if HAS_DELTA:   # the residual stream's add, in the activations' dtype (as x + delta rounds in torch)
            x = (x.to(tl.float32) + tl.load(delta_ptr + row * width + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * width + cols, x, mask=ok)
        x32 = x.to(tl.float32)
        scale = tl.rsqrt(tl.sum(x32 * x32, axis=0) / width + eps)   # torch's rsqrt, as LlamaRMSNorm
        normed = (x32 * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def rotary_and_cache(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, k_cache_ptr, v_cache_ptr,
                         cache_stride_head, heads, kv_heads,
                         HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)                      # q heads, then k heads
        dim = tl.arange(0, DIM_PAD)
        ok = dim < HEAD_DIM
        half = HEAD_DIM // 2
        partner = tl.where(dim < half, dim + half, dim - half)
        row_width = (heads + 2 * kv_heads) * HEAD_DIM
        base = qkv_ptr + token * row_width + head * HEAD_DIM
        x = tl.load(base + dim, mask=ok, other=0.0)
        other = tl.load(base + partner, mask=ok, other=0.0).to(tl.float32)
        rotated = tl.where(dim < half, -other, other).to(x.dtype)       # rotate_half(x)
        cos = tl.load(cos_ptr + token * HEAD_DIM + dim, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + token * HEAD_DIM + dim, mask=ok, other=0.0)
        # x * cos + rotate_half(x) * sin, each product rounded to the dtype as eager torch does
        first = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype).to(tl.float32)
        second = (rotated.to(tl.float32) * sin.to(tl.float32)).to(x.dtype).to(tl.float32)
        out = (first + second).to(x.dtype)
        if head < heads:
            tl.store(q_ptr + (token * heads + head) * HEAD_DIM + dim, out, mask=ok)
        else:
            kv_head = head - heads
            tl.store(k_ptr + (token * kv_heads + kv_head) * HEAD_DIM + dim, out, mask=ok)
            slot = tl.load(slots_ptr + token).to(tl.int64)
            cache_offset = kv_head.to(tl.int64) * cache_stride_head + slot * HEAD_DIM + dim
            tl.store(k_cache_ptr + cache_offset, out.to(k_cache_ptr.dtype.element_ty), mask=ok)
            value = tl.load(base + kv_heads * HEAD_DIM + dim, mask=ok, other=0.0)
            tl.store(v_cache_ptr + cache_offset, value.to(v_cache_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_and_mul(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr, PRECISE_EXP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=ok, other=0.0).to(tl.float32)
        if PRECISE_EXP:   # CUDA's expf, as torch's silu (tl.exp is the faster, approximate ex2 form)
            exp = libdevice.exp(-gate)
        else:             # Triton's interpreter: numpy's exp
            exp = tl.exp(-gate)
        activated = (gate / (1.0 + exp)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=ok)

    return add_rms_norm, rotary_and_cache, silu_and_mul


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [T, width] -> (x + delta, RMSNorm(x + delta) * weight); delta None: (x, RMSNorm(x) * weight)."""
    import triton
    rows, width = x.shape
    total = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    _kernels()[0][(rows,)](x, delta if delta is not None else x, weight, total, out, width, eps,
                           HAS_DELTA=delta is not None, WIDTH_PAD=triton.next_power_of_2(width), **EXACT)
    return total, out


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 Hkv) D] (contiguous), cos/sin [T, D] -> (q [T, H, D], k [T, Hkv, D]) rotated; the rotated
    k and the v of each token are written to its cache slot (k_cache/v_cache [Hkv, slots, D])."""
    import triton
    tokens = qkv.shape[0]
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _kernels()[1][(tokens, heads + kv_heads)](
        qkv, cos, sin, slots, q, k, k_cache, v_cache, k_cache.stride(0), heads, kv_heads,
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), **EXACT)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] (gate, then up) -> SiLU(gate) * up [T, I]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _kernels()[2][(rows, -(-width // block))](gate_up, out, width, BLOCK=block,
                                              PRECISE_EXP=os.environ.get("TRITON_INTERPRET") != "1", **EXACT)
    return out
