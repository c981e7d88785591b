"""Loads the model, owns the KV cache tensors, packs a step's chunks into one forward pass, returns logits.

Works with any transformers causal LM whose attention goes through `AttentionInterface` (Llama, Qwen, Mistral,
Gemma, Phi, ...): the step's tokens are packed into one [1, T] row with explicit position ids, and our paged
attention (engine_service.attention) reads and writes the engine's own cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common.logs import kv
from engine_service import attention, llama
from engine_service.kv_cache import BlockManager, CacheShape, KVCache
from engine_service.scheduler import ScheduledChunk

log = logging.getLogger("splitserve.engine.model")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str


def pick_device(requested: str) -> torch.device:
    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE=cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested in ("", "auto"):
        # fp32 on CPU keeps greedy output token-identical to transformers' default; bf16 on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if requested not in dtypes:
        raise ValueError(f"unknown dtype {requested!r}; use one of {sorted(dtypes)}")
    return dtypes[requested]


def _eos_ids(model: torch.nn.Module) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (model.generation_config, model.config):
        eos = getattr(source, "eos_token_id", None)
        for token in ([eos] if isinstance(eos, int) else eos or []):
            if token not in ids:
                ids.append(int(token))
    return tuple(ids)


class ModelRunner:
    def __init__(self, model_path: str, display_name: str, device: torch.device, dtype: torch.dtype,
                 kv_cache_bytes: int, block_size: int, max_model_len: int, fast_path: bool = True,
                 prefix_caching: bool = True, fault_token_id: int = -1, small_step_bf16: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.fault_token_id = fault_token_id   # fault injection for tests: a step computing this token raises
        config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attention.ATTENTION_NAME).to(device).eval()
        # Llama-family models get the hand-written forward pass; any other causal LM runs through transformers.
        self.fast = (llama.FastLlama(self.model, small_step_bf16) if fast_path and llama.supports(self.model)
                     else None)
        text_config = self.model.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        shape = CacheShape(
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            head_dim=head_dim,
            dtype=dtype,
        )
        num_blocks = max(1, kv_cache_bytes // (shape.bytes_per_token() * block_size))
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.cache = KVCache(shape, num_blocks, block_size, device)
        context = getattr(text_config, "max_position_embeddings", None) or getattr(config, "max_position_embeddings")
        if max_model_len > 0:
            context = min(context, max_model_len)
        capacity = num_blocks * block_size
        if context > capacity:
            log.warning("context capped by the KV cache %s", kv(context=context, capacity=capacity))
            context = capacity
        self.spec = ModelSpec(
            name=display_name,
            max_context_length=int(context),
            vocab_size=int(text_config.vocab_size),
            eos_token_ids=_eos_ids(self.model),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
        log.info("model ready %s", kv(name=display_name, device=str(device), dtype=self.spec.dtype,
                                      kv_blocks=num_blocks, block_size=block_size, context=context,
                                      fast_path=self.fast is not None))

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each position, given a block table (same leading shape or broadcastable)."""
        blocks = torch.gather(block_table, -1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Runs one step; returns the last logits of each chunk that samples ([S, vocab]) and those chunks, in
        the order of the rows."""
        decodes = [c for c in chunks if c.is_decode]
        prefills = [c for c in chunks if not c.is_decode]
        ordered = decodes + prefills
        device = self.device
        token_ids: list[int] = []
        positions: list[int] = []
        for c in decodes:
            token_ids.append(c.seq.token_at(c.start))
            positions.append(c.start)
        for c in prefills:
            token_ids.extend(c.seq.tokens(c.start, c.end))
            positions.extend(range(c.start, c.end))
        if self.fault_token_id >= 0 and self.fault_token_id in token_ids:
            raise RuntimeError(f"injected fault: token {self.fault_token_id} in the step")
        position_tensor = torch.tensor(positions, dtype=torch.long)
        # Slot of every new token, from its sequence's block table.
        owners = [i for i, c in enumerate(ordered) for _ in range(c.end - c.start)]
        width = max(len(c.seq.block_table) for c in ordered)
        table = torch.tensor([c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in ordered],
                             dtype=torch.long)
        slot_mapping = self._slots(table[owners], position_tensor.unsqueeze(1)).squeeze(1)
        decode_slots = decode_mask = None
        if decodes:
            lengths = torch.tensor([c.end for c in decodes], dtype=torch.long)
            max_len = int(lengths.max())
            span = torch.arange(max_len, dtype=torch.long).expand(len(decodes), max_len)
            valid = span < lengths.unsqueeze(1)
            decode_slots = self._slots(table[: len(decodes)], span.clamp(max=max_len - 1) * valid)
            if not bool(valid.all()):
                decode_mask = valid.view(len(decodes), 1, 1, max_len).to(device)
            decode_slots = decode_slots.to(device)
        prefill_chunks: list[attention.PrefillChunk] = []
        offset = len(decodes)
        for i, c in enumerate(prefills):
            n = c.end - c.start
            context_slots = None
            if c.start > 0:
                row = table[len(decodes) + i]
                context_slots = self._slots(row, torch.arange(c.end, dtype=torch.long)).to(device)
            prefill_chunks.append(attention.PrefillChunk(offset, offset + n, c.start, context_slots))
            offset += n
        keep = [i for i, c in enumerate(decodes) if c.samples]
        start = len(decodes)
        for c in prefills:
            start += c.end - c.start
            if c.samples:
                keep.append(start - 1)
        attention.set_step_context(attention.StepContext(
            k_cache=self.cache.k, v_cache=self.cache.v, slot_mapping=slot_mapping.to(device),
            num_decode=len(decodes), decode_slots=decode_slots, decode_mask=decode_mask, prefills=prefill_chunks))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        keep_rows = torch.tensor(keep, dtype=torch.long, device=device)
        try:
            if self.fast is not None:
                logits = self.fast(input_ids, position_tensor.to(device), keep_rows)
            else:
                logits = self.model(input_ids=input_ids.unsqueeze(0), position_ids=position_tensor.unsqueeze(0).to(device),
                                    use_cache=False, logits_to_keep=keep_rows).logits[0]
        finally:
            attention.set_step_context(None)
        return logits, [c for c in ordered if c.samples]
