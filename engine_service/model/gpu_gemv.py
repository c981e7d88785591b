"""y = x W^T (+ b) for one row of x on GPUs: a Triton matrix-vector product that streams W at the HBM rate.

A batch-1 decode step is a chain of matrix-vector products, each bound by reading its weights. cuBLAS picks
kernels made for matrices: measured on an H200 (bench/cuda.py, kernels section), its bf16 products at one row read
the Llama-3.2-1B layer weights at 1.4-3.7 TB/s of the 4.2 TB/s the device copies at. Here each program owns
BLOCK_N output columns and walks K in BLOCK_K-wide tiles (coalesced along W's rows), multiplying in fp32 and
summing in fp32, and rounds once to the output dtype: within half a step of the dtype of the exact product, plus
the fp32 sum's error (cuBLAS's split-K kernels round partial sums, and on the H200 some of their results are over
a step off).

Used for bf16/fp16 weights at one row, where measured faster than cuBLAS (`--fused-gpu-ops`); fp32 models keep
cuBLAS's products, so fp32 greedy stays token-identical to transformers.
"""
from __future__ import annotations

import functools

import torch


def config_for(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a product of W [n, k]: the fastest of the bench's grid on an H200 for the
    Llama-3.2-1B shapes (bench/cuda.py, kernels section): narrow column blocks where there are few columns (more
    programs), wide K tiles with 8 warps for long rows."""
    if k >= 4096:
        return 8, 1024, 8
    if n <= 4096:
        return 4, 512, 4
    return 16, 512, 4


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, b_ptr, out_ptr, n, k, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        column_ok = columns < n
        rows = w_ptr + columns.to(tl.int64)[:, None] * k
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in range(0, k, BLOCK_K):
            offsets = start + tl.arange(0, BLOCK_K)
            if EVEN_K:
                w = tl.load(rows + offsets[None, :], mask=column_ok[:, None], other=0.0)
                x = tl.load(x_ptr + offsets)
            else:
                k_ok = offsets < k
                w = tl.load(rows + offsets[None, :], mask=column_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptr + offsets, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + columns, y.to(out_ptr.dtype.element_ty), mask=column_ok)

    return gemv


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K], weight [N, K] (contiguous) -> [1, N] in x's dtype."""
    n, k = weight.shape
    block_n, block_k, warps = config or config_for(n, k)
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _kernel()[(-(-n // block_n),)](x, weight, bias if bias is not None else weight, out, n, k,
                                   HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                   EVEN_K=k % block_k == 0, num_warps=warps)
    return out
