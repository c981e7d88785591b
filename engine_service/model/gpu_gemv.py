"""y = x W^T (+ b) for one row of x on GPUs: a Triton matrix-vector product that streams W at the HBM rate, with
the small operation before the product done in its prologue.

A batch-1 decode step is a chain of matrix-vector products, each bound by reading its weights. cuBLAS picks
kernels made for matrices: measured on an H200 (bench/cuda.py, `kernels` section), its bf16 products at one row
read the Llama-3.2-1B layer weights at 1.6-3.7 TB/s of the 4.3 TB/s the device copies at. Here each program owns
BLOCK_N output columns and walks K in BLOCK_K-wide tiles (coalesced along W's rows), multiplying in fp32 and
summing in fp32, and rounds once to the output dtype (exact products, fp32 sums: within half a step of the dtype of
the exact result, plus the fp32 sum's error; cuBLAS's split-K kernels round partial sums and are not).

The step's other operations are a few microseconds each, and at one row the launches and the gaps between them are
most of their cost. So the products take the operation before them as a prologue, every program computing its
input row itself (a few KiB, from L2):
- "norm": the residual add and RMSNorm (fused_ops.add_rms_norm's roundings), program 0 storing the sum;
- "silu": SiLU(gate) * up (fused_ops.silu_and_mul's roundings).
A layer's step is then qkv(norm) -> rotary + cache -> attention -> o -> gate_up(norm) -> down(silu): six kernels.

Used for bf16/fp16 weights at one row (`--fused-gpu-ops`); fp32 models keep cuBLAS's products, so fp32 greedy stays
token-identical to transformers.
"""
from __future__ import annotations

import functools
import os

import torch

from engine_service.model.fused_ops import EXACT

PLAIN, NORM, SILU = 0, 1, 2


def config_for(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a product of W [n, k]: the fastest of the bench's grid on an H200 for the
    Llama-3.2-1B shapes (kernels section): narrow column blocks where there are few columns (more programs), wide
    K tiles with 8 warps for long rows."""
    if k >= 4096:
        return 8, 1024, 8
    if n <= 4096:
        return 4, 512, 4
    return 16, 512, 4


@functools.cache
def _kernel():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def gemv(x_ptr, delta_ptr, norm_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, n, k, eps,
             PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISE_EXP: tl.constexpr):
        program = tl.program_id(0)
        columns = program * BLOCK_N + tl.arange(0, BLOCK_N)
        column_ok = columns < n
        rows = w_ptr + columns.to(tl.int64)[:, None] * k
        dtype = out_ptr.dtype.element_ty
        scale = 0.0
        if PROLOGUE == 1:   # the row's RMS first: x + delta rounded to the dtype, squared and summed in fp32
            squares = tl.zeros([BLOCK_K], tl.float32)
            for start in range(0, k, BLOCK_K):
                offsets = start + tl.arange(0, BLOCK_K)
                k_ok = offsets < k
                x = tl.load(x_ptr + offsets, mask=k_ok, other=0.0)
                if HAS_DELTA:
                    x = (x.to(tl.float32) + tl.load(delta_ptr + offsets, mask=k_ok, other=0.0).to(tl.float32))
                    x = x.to(dtype)
                    if program == 0:
                        tl.store(sum_ptr + offsets, x, mask=k_ok)
                x32 = x.to(tl.float32)
                squares += x32 * x32
            scale = tl.rsqrt(tl.sum(squares, axis=0) / k + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in range(0, k, BLOCK_K):
            offsets = start + tl.arange(0, BLOCK_K)
            k_ok = offsets < k
            if EVEN_K:
                w = tl.load(rows + offsets[None, :], mask=column_ok[:, None], other=0.0)
            else:
                w = tl.load(rows + offsets[None, :], mask=column_ok[:, None] & k_ok[None, :], other=0.0)
            if PROLOGUE == 1:
                x = tl.load(x_ptr + offsets, mask=k_ok, other=0.0)
                if HAS_DELTA:
                    x = (x.to(tl.float32) + tl.load(delta_ptr + offsets, mask=k_ok, other=0.0).to(tl.float32))
                    x = x.to(dtype)
                normed = (x.to(tl.float32) * scale).to(dtype).to(tl.float32)
                weight = tl.load(norm_ptr + offsets, mask=k_ok, other=0.0).to(tl.float32)
                x = (normed * weight).to(dtype)
            elif PROLOGUE == 2:
                gate = tl.load(x_ptr + offsets, mask=k_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + k + offsets, mask=k_ok, other=0.0).to(tl.float32)
                if PRECISE_EXP:
                    exp = libdevice.exp(-gate)
                else:
                    exp = tl.exp(-gate)
                activated = (gate / (1.0 + exp)).to(dtype).to(tl.float32)
                x = (activated * up).to(dtype)
            else:
                x = tl.load(x_ptr + offsets, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + columns, y.to(dtype), mask=column_ok)

    return gemv


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            delta: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
            config: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    block_n, block_k, warps = config or config_for(n, k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if delta is not None else x
    _kernel()[(-(-n // block_n),)](
        x, delta if delta is not None else x, norm if norm is not None else weight, total, weight,
        bias if bias is not None else weight, out, n, k, eps,
        PROLOGUE=prologue, HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, PRECISE_EXP=os.environ.get("TRITON_INTERPRET") != "1",
        num_warps=warps, **EXACT)
    return total, out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (contiguous) -> x W^T + b [1, N] in x's dtype."""
    return _launch(PLAIN, x.contiguous(), weight, bias, config=config)[1]


def norm_gemv(x: torch.Tensor, delta: torch.Tensor | None, norm: torch.Tensor, eps: float, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [1, K] -> (x + delta, RMSNorm(x + delta) * norm @ W^T + b); delta None: (x, RMSNorm(x) ...)."""
    return _launch(NORM, x, weight, bias, delta, norm, eps)


def silu_gemv(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gate_up [1, 2K] (gate, then up) -> (SiLU(gate) * up) @ W^T [1, N]."""
    return _launch(SILU, gate_up, weight, None)[1]
