"""y = x W^T + b with the fastest kernel this device has for the step's shape.

On CPUs, fp32 weights are repacked once into oneDNN's blocked layout: at the rows of a prefill it runs about
twice as fast as the default BLAS call (measured on the 2-core AVX2 CI machine, SmolLM2 shapes); a matrix served
from GGUF blocks keeps no fp32 copy. Optionally
compact weights serve steps of at most `COMPACT_ROWS` rows (decode steps): a small step is bound by reading the
weights, and compact weights are fewer bytes. A GGUF-sourced model's own blocks (`blocks`: Q4_1 / Q8_0, the
exact weights at 0.6-1.1 bytes each) serve every step, prefills too (from 64 to 2,048 rows our kernel's panels
took 0.82-0.93x oneDNN's time over the fp32 weights, SmolLM2's layer shapes on the CI machine, 2026-12-07); other
models read a bf16 copy (half the bytes) for steps of up to `COMPACT_ROWS` rows. On
AVX2 CPUs our own kernels (cpu_kernels.cpp) widen either to fp32 in registers and accumulate in fp32 with fp32
activations: from 13 rows on they run near the fp32 FMA rate (as fast as oneDNN's fp32 product up to 64 rows,
measured on the CI machine); below it the widening is as much of the work as the multiply-adds (on the CI
machine a batch-1 product over GGUF blocks held in L2 ran no faster than over blocks streamed from memory).
Without the kernels, torch's bf16 matmul serves 1-2 rows; it is never used for larger steps, far slower in bf16
on CPUs without bf16 instructions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_service.model import cpu_kernels, gpu_gemv

COMPACT_ROWS = 64      # rows served by a bf16 copy with our kernels (GGUF blocks serve every step)
BF16_TORCH_ROWS = 2    # rows served by the bf16 copy with torch's bf16 matmul (no kernel)


def onednn_available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def compact_kernels(weight: torch.Tensor, compact: bool):
    """Our kernels' module where they serve compact weights: an fp32 matrix on a CPU that has them; else None."""
    if compact and weight.dtype == torch.float32 and weight.device.type == "cpu":
        return cpu_kernels.load()
    return None


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compact: bool = False,
                 blocks: tuple | None = None) -> None:
        """blocks: (kernel, repacked GGUF blocks) that are exactly `weight` (gguf_weights.blocks_for): every step
        reads them and no other copy is made; the blocks are the only one (SmolLM2: 96 MB of blocks, where a packed
        fp32 copy, read by no step since the blocks serve prefills too, was another 538 MB; making it and a bf16 copy
        at load, to drop them once the blocks came, took 0.7-0.9 s of a ~7 s load)."""
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fp32_bytes = weight.numel() * weight.element_size()
        self.weight = None
        self.packed = None
        self.bf16 = None
        self.blocks = None if blocks is None else (*blocks, self.in_features)
        self.kernels = None
        self.bf16_rows = 0
        self.gpu_gemv = False   # GPUs: one-row products through gpu_gemv (FastLlama turns it on)
        if self.blocks is not None:
            self.kernels = compact_kernels(weight, True)   # loaded already: blocks_for took a kernel from it
            return
        self.weight = weight
        if onednn_available(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None  # the packed copy replaces it
        if compact and weight.dtype == torch.float32:
            self.bf16 = (weight.to(torch.bfloat16).contiguous(), None if bias is None else bias.to(torch.bfloat16))
            self.kernels = compact_kernels(weight, compact)
            self.bf16_rows = COMPACT_ROWS if self.kernels is not None else BF16_TORCH_ROWS

    def compact(self) -> torch.Tensor:
        """The weights our kernels read for a decode step: GGUF blocks where there are some, else bf16."""
        return self.blocks[1] if self.blocks is not None else self.bf16[0]

    def weights_for(self, rows: int) -> str:
        """Which weights a step of `rows` rows reads: "blocks", "bf16" or "fp32" (__call__ and bytes_read)."""
        if self.blocks is not None:
            return "blocks"
        if self.bf16 is not None and rows <= self.bf16_rows:
            return "bf16"
        return "fp32"

    def bytes_read(self, rows: int) -> int:
        """The bytes of weights a step of `rows` rows reads (bench/roofline.py)."""
        weights = self.weights_for(rows)
        if weights == "blocks":
            return self.blocks[1].nbytes
        if weights == "bf16":
            return self.bf16[0].nbytes
        return self.fp32_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gpu_gemv and x.shape[0] == 1:
            return gpu_gemv.gemv(x, self.weight, self.bias)
        weights = self.weights_for(x.shape[0])
        if weights == "blocks":
            kernel, blocks, in_features = self.blocks
            return kernel(x, blocks, in_features, self.out_features, self.bias)
        if weights == "bf16":
            if self.kernels is not None:
                return self.kernels.linear_bf16(x, self.bf16[0], self.bias)
            return F.linear(x.to(torch.bfloat16), *self.bf16).to(x.dtype)
        return self.fp32(x)

    def fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The product over the fp32 weights (oneDNN's packed copy where there is one): a prefill's path (never
        taken by a matrix served from blocks, which holds no fp32 copy)."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
