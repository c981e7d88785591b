"""The paged KV cache: fixed-size blocks of token slots, a free list, and per-layer key/value tensors."""
from __future__ import annotations

from collections import OrderedDict
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
    """Owns the blocks: which are free, which sequences hold which, and which hold a reusable prompt prefix.

    Prefix caching: a full block is keyed by a hash chain over its tokens and every token before it; a new
    sequence starts from the longest run of cached blocks matching its tokens (verified token by token, since
    hashes can collide). Blocks are reference-counted; a freed block keeps its contents and key until the free
    list hands it out again, least recently freed first. Never touches tensors.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                      # hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

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
            seq.block_table.append(self._take_free())

    def match_prefix(self, seq: Sequence) -> int:
        """Gives a sequence with no blocks the cached blocks of its longest cached prefix (always leaving at
        least one token to compute, whose logits give the next token). Returns the tokens looked up."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching:
            return 0
        full_blocks = (seq.num_tokens - 1) // self.block_size
        parent = None
        for index in range(full_blocks):
            tokens = tuple(seq.tokens(index * self.block_size, (index + 1) * self.block_size))
            key = hash((parent, tokens))
            block = self.cached.get(key)
            if block is None or self.block_tokens[block] != tokens:
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(key)
            parent = key
        seq.num_computed = len(seq.block_table) * self.block_size
        return full_blocks * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Keys the blocks that computing has filled since the last call, so later sequences can reuse them."""
        if not self.prefix_caching:
            return
        while len(seq.block_hashes) < seq.num_computed // self.block_size:
            index = len(seq.block_hashes)
            tokens = tuple(seq.tokens(index * self.block_size, (index + 1) * self.block_size))
            key = hash((seq.block_hashes[-1] if seq.block_hashes else None, tokens))
            seq.block_hashes.append(key)
            block = seq.block_table[index]
            if key not in self.cached and self.block_hash[block] is None:
                self.cached[key] = block
                self.block_hash[block] = key
                self.block_tokens[block] = tokens

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Gives child (no blocks yet) parent's computed positions: the full blocks are shared (reference-counted),
        a partly filled last block is copied into a fresh one. Returns (source, copy) blocks whose contents the
        caller must copy, or None."""
        assert not child.block_table
        full, partial = divmod(parent.num_computed, self.block_size)
        if partial and not self.free_blocks:
            raise MemoryError("KV cache exhausted")
        for block in parent.block_table[:full]:
            self.ref_counts[block] += 1
            child.block_table.append(block)
        child.num_computed = parent.num_computed
        if not partial:
            return None
        block = self._take_free()
        child.block_table.append(block)
        return parent.block_table[full], block

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so that they are also the first to be reused: prefixes stay cached longest.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _take_free(self) -> int:
        """The least recently freed block, its cached prefix forgotten, held once."""
        block, _ = self.free_blocks.popitem(last=False)
        self._forget(block)
        self.ref_counts[block] = 1
        return block

    def _forget(self, block: int) -> None:
        key = self.block_hash[block]
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]
        self.block_hash[block] = None
        self.block_tokens[block] = None


class KVCache:
    """Per-layer [kv_heads, num_blocks * block_size + scratch_slots, head_dim] key and value tensors.

    Heads first: gathering a batch's context slots gives [kv_heads, slots, head_dim], which the attention's
    batched matmuls read as it is (one batch of products per head), with no copy into another layout.
    The scratch slots past the blocks hold the keys/values of a step's speculative tree rows (several guesses at
    the same position); the accepted ones are copied to their sequence's blocks afterwards."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device,
                 scratch_slots: int = 0) -> None:
        self.scratch_base = num_blocks * block_size
        self.scratch_slots = scratch_slots
        slots = self.scratch_base + scratch_slots
        self.k = [torch.zeros(shape.num_kv_heads, slots, shape.head_dim, dtype=shape.dtype, device=device)
                  for _ in range(shape.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]

    def read_blocks(self, blocks: list[int], block_size: int) -> torch.Tensor:
        """The blocks' keys and values, layer-major, on the CPU: [layers, 2 (k, v), kv_heads, len(blocks) *
        block_size, head_dim] (what a KV transfer sends)."""
        slots = self._block_slots(blocks, block_size)
        return torch.stack([torch.stack((k.index_select(1, slots), v.index_select(1, slots)))
                            for k, v in zip(self.k, self.v)]).cpu()

    def write_blocks(self, blocks: list[int], block_size: int, data: torch.Tensor) -> None:
        """Writes what read_blocks returned (of another engine with the same layout) into these blocks."""
        slots = self._block_slots(blocks, block_size)
        data = data.to(self.k[0].device)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            k.index_copy_(1, slots, data[layer, 0])
            v.index_copy_(1, slots, data[layer, 1])

    def _block_slots(self, blocks: list[int], block_size: int) -> torch.Tensor:
        starts = torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * block_size
        return (starts + torch.arange(block_size)).flatten().to(self.k[0].device)

    def copy_block(self, source: int, target: int, block_size: int) -> None:
        slots = torch.arange(block_size, device=self.k[0].device)
        self.copy_slots(slots + source * block_size, slots + target * block_size)

    def copy_slots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        for cache in (*self.k, *self.v):
            cache.index_copy_(1, target, cache.index_select(1, source))
