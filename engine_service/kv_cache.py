"""The paged KV cache: fixed-size blocks of token slots, a free list, and per-layer key/value tensors."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from engine_service.sequence import Sequence


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()


class BlockManager:
    """Owns the blocks: which are free, which sequence holds which. Never touches tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free:
            raise MemoryError("KV cache exhausted")
        for _ in range(needed):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0


class KVCache:
    """Per-layer [num_blocks * block_size, kv_heads, head_dim] key and value tensors."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device) -> None:
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype, device=device)
                  for _ in range(shape.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
