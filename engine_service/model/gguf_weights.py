"""The weights our kernels read from the GGUF file a model was converted from, in its own block formats.

A model served from a GGUF file (SmolLM2 by default) *is* the dequantisation of that file's Q4_1 / Q8_0 blocks:
the fp32 weights transformers builds are exactly d * q + m. The blocks are 3-4x fewer bytes than bf16, so our
kernels (cpu_kernels.cpp) read them at every step, repacked once into the layout they read fastest (`repack`:
groups of 8 rows side by side, the same bytes per row): the same weight values, not a lower precision. Each matrix is
checked row by row against the loaded fp32 weights (bit for bit) before it is used; any mismatch (another
conversion, a layout we do not know) leaves that matrix on the other paths.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from common.logs import kv

log = logging.getLogger("splitserve.engine.gguf")
KERNELS = {"Q4_1": "linear_q4_1", "Q8_0": "linear_q8_0"}
SOURCE_FILE = "gguf_source.txt"   # written by common.models next to a converted GGUF model


def source_of(model_path: str) -> Path | None:
    marker = Path(model_path) / SOURCE_FILE
    if not marker.exists():
        return None
    path = Path(marker.read_text().strip())
    return path if path.exists() else None


class GGUFBlocks:
    """The quantized tensors of one GGUF file, by name."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        self.tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def matching(self, names: list[str], weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """The blocks of the named tensors (stacked by rows) reordered so that they dequantize to exactly
        `weight` ([N, K] fp32), as (kind, uint8 [N, row bytes]); None when they do not."""
        from gguf import quants
        tensors = [self.tensors.get(name) for name in names]
        if any(t is None for t in tensors) or len({t.tensor_type.name for t in tensors}) != 1:
            return None
        kind = tensors[0].tensor_type.name
        if kind not in KERNELS:
            return None
        blocks = np.concatenate([np.asarray(t.data) for t in tensors])
        values = np.concatenate([quants.dequantize(np.asarray(t.data), t.tensor_type) for t in tensors])
        target = weight.detach().float().cpu().numpy()
        if values.shape != target.shape:
            return None
        # GGUF stores q/k rows permuted for its rotary layout: find each fp32 row among the dequantized ones.
        index = {row.tobytes(): i for i, row in enumerate(values)}
        order = [index.get(row.tobytes()) for row in target]
        if any(i is None for i in order):
            return None
        return kind, torch.from_numpy(repack(kind, blocks[order]))


PAIR_ROWS = 16   # the kernels' unit: two groups of 8 rows


def repack(kind: str, blocks: np.ndarray) -> np.ndarray:
    """GGUF rows of Q4_1 / Q8_0 blocks ([N, row bytes] uint8) in the layout cpu_kernels.cpp reads (described there):
    groups of 8 rows, per block the 8 rows' quants side by side (Q4_1: quad t of a row = its weights t, t + 8,
    t + 16, t + 24 in nibbles 0-3; Q8_0: position k), then their fp16 scales (then Q4_1's fp16 minimums); zero rows
    up to a multiple of 16. [N rounded up to 16 / 8, K / 32 * 8 * block bytes]: the same values, the same bytes
    per row."""
    rows = blocks.shape[0]
    block_bytes = 20 if kind == "Q4_1" else 34
    padded = -(-rows // PAIR_ROWS) * PAIR_ROWS
    per_block = np.zeros((padded, blocks.shape[1] // block_bytes, block_bytes), np.uint8)
    per_block[:rows] = np.ascontiguousarray(blocks).reshape(rows, -1, block_bytes)
    count = per_block.shape[1]
    if kind == "Q8_0":
        parts = [per_block[:, :, 2:].reshape(padded, count, 32, 1), per_block[:, :, :2].reshape(padded, count, 1, 2)]
    else:
        nibbles = per_block[:, :, 4:]   # byte j: weight j in the low nibble, weight j + 16 in the high one
        weights = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2).astype(np.uint16)
        by_nibble = weights.reshape(padded, count, 4, 8)   # [.., s, t] = weight 8s + t
        quads = by_nibble[:, :, 0] | by_nibble[:, :, 1] << 4 | by_nibble[:, :, 2] << 8 | by_nibble[:, :, 3] << 12
        parts = [quads.astype("<u2").view(np.uint8).reshape(padded, count, 8, 2),
                 per_block[:, :, :2].reshape(padded, count, 1, 2), per_block[:, :, 2:4].reshape(padded, count, 1, 2)]
    grouped = []
    for part in parts:   # [row, block, unit, bytes] -> [group, block, unit, row in group, bytes]
        units, size = part.shape[2:]
        part = part.reshape(padded // 8, 8, count, units, size)
        grouped.append(part.transpose(0, 2, 3, 1, 4).reshape(padded // 8, count, -1))
    return np.ascontiguousarray(np.concatenate(grouped, axis=2).reshape(padded // 8, -1))


def blocks_for(blocks: GGUFBlocks | None, kernels, names: list[str], weight: torch.Tensor) -> tuple | None:
    """(kernel, repacked blocks) of the named GGUF tensors for a Linear (y = x weight^T) when they are exactly
    `weight`, else None (the matrix keeps the other paths)."""
    if blocks is None or kernels is None:
        return None
    found = blocks.matching(names, weight)
    if found is None:
        log.info("GGUF blocks do not match; this matrix keeps the other paths %s", kv(tensors=",".join(names)))
        return None
    kind, data = found
    return getattr(kernels, KERNELS[kind]), data


def layer_tensor_names(index: int) -> dict[str, list[str]]:
    """GGUF tensor names (llama.cpp's) behind each fused matrix of FastLlama's layer `index`."""
    return {"qkv": [f"blk.{index}.attn_q.weight", f"blk.{index}.attn_k.weight", f"blk.{index}.attn_v.weight"],
            "o": [f"blk.{index}.attn_output.weight"],
            "gate_up": [f"blk.{index}.ffn_gate.weight", f"blk.{index}.ffn_up.weight"],
            "down": [f"blk.{index}.ffn_down.weight"]}


def head_tensor_names(blocks: GGUFBlocks | None) -> list[str]:
    return ["output.weight"] if blocks is not None and "output.weight" in blocks.tensors else ["token_embd.weight"]
