"""y = x W^T + b with the fastest kernel this device has for the step's shape.

On CPUs, fp32 weights are repacked once into oneDNN's blocked layout: at the rows of a prefill it runs about
twice as fast as the default BLAS call (measured on the 2-core AVX2 CI machine, SmolLM2 shapes). Optionally
compact weights serve steps of at most `COMPACT_ROWS` rows (decode steps): such a step is bound by reading the
weights, and a bf16 copy halves the bytes (a GGUF-sourced model's own blocks, `use_blocks`, cut them further).
On AVX2 CPUs our own kernel (cpu_kernels.cpp) widens the bf16 weights to fp32 in registers and accumulates in fp32
with fp32 activations; elsewhere torch's bf16 matmul serves them (1-2 rows). bf16 is never used for larger steps,
whose matrix products are far slower in bf16 on CPUs without native bf16 instructions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_service.model import cpu_kernels

COMPACT_ROWS = 16      # rows served by the bf16 copy with our kernel
BF16_TORCH_ROWS = 2    # rows served by the bf16 copy with torch's bf16 matmul (no kernel)
BLOCKS_ROWS = 2        # rows served from GGUF blocks (compute-bound beyond: the bf16 copy is faster from 3 rows)


def onednn_available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compact: bool = False) -> None:
        self.bias = bias
        self.weight = weight
        self.in_features = weight.shape[1]
        self.fp32_bytes = weight.numel() * weight.element_size()
        self.packed = None
        if onednn_available(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None  # the packed copy replaces it
        self.bf16 = None
        self.blocks = None
        self.kernels = None
        self.bf16_rows = 0
        if compact and weight.dtype == torch.float32:
            self.bf16 = (weight.to(torch.bfloat16).contiguous(), None if bias is None else bias.to(torch.bfloat16))
            self.kernels = cpu_kernels.load() if weight.device.type == "cpu" else None
            self.bf16_rows = COMPACT_ROWS if self.kernels is not None else BF16_TORCH_ROWS

    def use_blocks(self, kernel, blocks: torch.Tensor, in_features: int) -> None:
        """Small steps read the weights in a GGUF block format (same values as the fp32 weights) with kernel."""
        self.blocks = (kernel, blocks, in_features)

    def compact(self, blocks: bool) -> torch.Tensor:
        """The weights our kernels read for a step: GGUF blocks when asked (and there are some), else bf16."""
        return self.blocks[1] if blocks and self.blocks is not None else self.bf16[0]

    def bytes_read(self, rows: int) -> int:
        """The bytes of weights a step of `rows` rows reads: the format __call__ picks for it (bench/roofline.py)."""
        if self.blocks is not None and rows <= BLOCKS_ROWS:
            return self.blocks[1].nbytes
        if self.bf16 is not None and rows <= self.bf16_rows:
            return self.bf16[0].nbytes
        return self.fp32_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and x.shape[0] <= BLOCKS_ROWS:
            kernel, blocks, in_features = self.blocks
            return kernel(x, blocks, in_features, self.bias)
        if self.bf16 is not None and x.shape[0] <= self.bf16_rows:
            if self.kernels is not None:
                return self.kernels.linear_bf16(x, self.bf16[0], self.bias)
            return F.linear(x.to(torch.bfloat16), *self.bf16).to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
