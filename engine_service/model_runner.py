"""Loads the model, owns the KV cache, and runs a step: prepares the inputs of the step's chunks, runs the model
once, and returns a `StepOutput` (the logits kept, and each chunk's rows, hidden states and cache slots).

Works with any transformers causal LM whose attention goes through `AttentionInterface` (Llama, Qwen, Mistral,
Gemma, Phi, ...): the step's tokens are packed into one [1, T] row with explicit position ids, and our paged
attention (engine_service.model.attention) reads and writes the engine's own cache. Llama-family models take the
hand-written forward pass instead (engine_service.model.llama).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common.logs import kv
from engine_service.kv_cache import BlockManager, CacheShape, KVCache
from engine_service.sampling import SamplingParams
from engine_service.model import attention, gguf_weights, llama, paged_decode
from engine_service.model.cuda_graphs import DecodeGraphs
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence

log = logging.getLogger("splitserve.engine.model")
# Cache slots for the speculative rows of one step that share a position (lookahead and contrastive guesses).
SCRATCH_SLOTS = 512


@dataclass
class ChunkOutput:
    """What one chunk computed: `rows` of StepOutput.logits (its last row when it yields a token, every row of a
    tree, else none), the cache slots its rows wrote, and the final hidden states of its rows (want_hidden)."""
    rows: range
    slots: list[int]
    hidden: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What a forward pass returns: the logits it kept, and each chunk's share of them."""
    logits: torch.Tensor                          # [kept rows, vocab]
    chunks: dict[ScheduledChunk, ChunkOutput]

    def logits_of(self, chunk: ScheduledChunk) -> torch.Tensor:
        rows = self.chunks[chunk].rows
        return self.logits[rows.start: rows.stop]

    def last_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """[len(chunks), vocab]: each chunk's last kept row (a view, not a copy, when the rows are consecutive)."""
        rows = [self.chunks[c].rows.stop - 1 for c in chunks]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.logits[rows[0]: rows[0] + len(rows)]
        return self.logits[torch.tensor(rows, device=self.logits.device)]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raises ValueError when this model cannot take the prompt."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.max_context_length} tokens, which leaves no room for output")

    def check_token_ids(self, params: SamplingParams) -> None:
        """Raises ValueError when a parameter names a token this model does not have (a step would fail on it)."""
        if any(token >= self.vocab_size for token in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be below the vocabulary size {self.vocab_size}")
        if any(token >= self.vocab_size for token, _ in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids below the vocabulary size {self.vocab_size}")


def pick_device(requested: str) -> torch.device:
    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE=cuda was asked for but no CUDA device is available")
    return device


# The names --dtype and --kv-cache-dtype take (besides auto).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested in ("", "auto"):
        # fp32 on CPU keeps greedy output token-identical to transformers' default; bf16 on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use one of {sorted(DTYPES)}")
    return DTYPES[requested]


def pick_kv_cache_dtype(requested: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """--kv-cache-dtype: auto stores keys and values in the model's dtype. A 16-bit cache under an fp32 model (as
    vLLM's --kv-cache-dtype and llama.cpp's default fp16 cache) halves the cache's memory and the bytes a decode
    step's attention reads, and rounds what the model attends. On CPUs only: the GPU paths (paged decode kernel,
    fused ops, CUDA graphs) are built and tested for a cache in the model's dtype."""
    if requested in ("", "auto"):
        return dtype
    if requested not in DTYPES:
        raise ValueError(f"unknown KV-cache dtype {requested!r}; use auto or one of {sorted(DTYPES)}")
    chosen = DTYPES[requested]
    if chosen != dtype and device.type != "cpu":
        raise ValueError(f"a KV cache in {requested} under a {str(dtype).removeprefix('torch.')} model is supported "
                         f"on CPUs only; on {device.type} use --kv-cache-dtype auto")
    return chosen


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
                 prefix_caching: bool = True, fault_token_id: int = -1, compact_decode_weights: bool = False,
                 step_delay: float = 0.0, cuda_graphs: bool = True, fused_gpu_ops: bool = True,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        """kv_cache_dtype: keys and values stored in it (pick_kv_cache_dtype); None: the model's dtype."""
        self.model_path = model_path   # also the tokenizer's folder (structured output's vocabulary)
        self.device = device
        self.dtype = dtype
        self.fault_token_id = fault_token_id   # fault injection for tests: a step computing this token raises
        self.step_delay = step_delay           # fault tests: a slow engine, so that a kill lands mid-stream
        config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attention.ATTENTION_NAME).to(device).eval()
        # Llama-family models get the hand-written forward pass; any other causal LM runs through transformers.
        gguf = None
        if compact_decode_weights and fast_path and device.type == "cpu" and dtype == torch.float32:
            source = gguf_weights.source_of(model_path)
            gguf = gguf_weights.GGUFBlocks(source) if source is not None else None
        use_fast = fast_path and llama.supports(self.model)
        self.fast = llama.FastLlama(self.model, compact_decode_weights, gguf, fused_gpu_ops) if use_fast else None
        text_config = self.model.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        shape = CacheShape(
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            head_dim=head_dim,
            dtype=kv_cache_dtype or dtype,
        )
        # GPUs: decode attention reads the paged cache in place (a Triton kernel), and plain decode steps replay
        # CUDA graphs (capture_graphs).
        self.paged_kernel = self.fast is not None and paged_decode.available(device)
        self.use_graphs = cuda_graphs
        self.graphs: DecodeGraphs | None = None
        num_blocks = max(1, kv_cache_bytes // (shape.bytes_per_token() * block_size))
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.cache = KVCache(shape, num_blocks, block_size, device, scratch_slots=SCRATCH_SLOTS)
        context = getattr(text_config, "max_position_embeddings", None) or getattr(config, "max_position_embeddings")
        if max_model_len > 0:
            context = min(context, max_model_len)
        capacity = num_blocks * block_size
        if context > capacity:
            log.warning("context capped by the KV cache %s", kv(context=context, capacity=capacity))
            context = capacity
        self.model_spec = ModelSpec(
            name=display_name,
            max_context_length=int(context),
            vocab_size=int(text_config.vocab_size),
            eos_token_ids=_eos_ids(self.model),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
        log.info("model ready %s", kv(name=display_name, device=str(device), dtype=self.model_spec.dtype,
                                      kv_cache_dtype=str(shape.dtype).removeprefix("torch."), kv_blocks=num_blocks,
                                      block_size=block_size, context=context, fast_path=self.fast is not None))

    def draft_layers(self, requested: int) -> int:
        """How many of the model's first layers may draft (--draft-layers; -1: a quarter): fewer than all of them,
        and none without the Llama-family fast path (it runs a prefix of the layers)."""
        num_layers = len(self.fast.layers) if self.fast is not None else 0
        return max(0, min(num_layers // 4 if requested < 0 else requested, num_layers - 1))

    def _slots(self, block_table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cache slot of each position, given a block table (same number of dimensions: a table per row of
        positions, or one table for a 1-D run of positions). numpy: see forward."""
        blocks = np.take_along_axis(block_table, positions // self.block_size, axis=-1)
        return blocks * self.block_size + positions % self.block_size

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk], num_layers: int | None = None) -> StepOutput:
        """Runs one step over the chunks. Keeps the logits of each chunk's last row when it yields a token, and of
        every row of a tree (a strategy's guesses); the hidden states of the chunks that want them; the cache
        slots every chunk wrote. num_layers: run only the first layers (a self-speculative draft)."""
        decodes = [c for c in chunks if c.is_decode and c.tree is None]
        # A linear chain of guesses (a speculative step) is decode rows of one sequence: row i attends the cache up
        # to its own position, as a decode does. With the decodes, such steps take the one-call kernel on CPU.
        chains = [c for c in chunks if c.tree is not None and not c.want_hidden and c.start > 0 and c.tree.in_place]
        in_rows = set(decodes) | set(chains)
        others = [c for c in chunks if c not in in_rows]
        device = self.device
        token_ids: list[int] = []
        positions: list[int] = []
        row_chunk: list[int] = []        # for each decode row, its chunk's index in decodes + chains
        for i, c in enumerate(decodes):
            token_ids.append(c.seq.token_at(c.start))
            positions.append(c.start)
            row_chunk.append(i)
        for i, c in enumerate(chains, start=len(decodes)):
            token_ids.extend(c.tree.tokens)
            positions.extend(c.start + offset for offset in c.tree.offsets)
            row_chunk.extend([i] * len(c.tree.tokens))
        for c in others:
            if c.tree is not None:
                token_ids.extend(c.tree.tokens)
                positions.extend(c.start + offset for offset in c.tree.offsets)
            else:
                token_ids.extend(c.seq.tokens(c.start, c.end))
                positions.extend(range(c.start, c.end))
        if self.fault_token_id >= 0 and self.fault_token_id in token_ids:
            raise RuntimeError(f"injected fault: token {self.fault_token_id} in the step")
        if self.step_delay:
            time.sleep(self.step_delay)
        if (self.graphs is not None and decodes and not chains and not others and num_layers is None
                and all(c.yields_token for c in decodes)
                and self.graphs.fits(len(decodes), max(len(c.seq.block_table) for c in decodes))):
            return self._graph_step(decodes, token_ids, positions)
        # The step's index arithmetic in numpy: a few microseconds an operation, where each torch op costs tens of
        # them once a CPU step has streamed the weights through the caches (~0.3 ms of a batch-1 step).
        position_array = np.array(positions, dtype=np.int64)
        position_tensor = torch.from_numpy(position_array)
        ordered = decodes + chains + others
        width = max(len(c.seq.block_table) for c in ordered)
        table_array = np.array([c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in ordered],
                               dtype=np.int64)
        slot_parts: list[torch.Tensor] = []
        slots_of: dict[ScheduledChunk, list[int]] = {}
        decode_slots = decode_mask = lengths = decode_tables = None
        num_rows = len(row_chunk)
        if num_rows:
            row_table = table_array[row_chunk]
            row_positions = position_array[:num_rows]
            row_slots = self._slots(row_table, row_positions[:, None])[:, 0]
            slot_parts.append(torch.from_numpy(row_slots))
            row_lengths = row_positions + 1
            if self.paged_kernel:   # the kernel reads the cache through the block tables
                decode_tables = torch.from_numpy(row_table.astype(np.int32)).to(device, non_blocking=True)
                lengths = torch.from_numpy(row_lengths.astype(np.int32)).to(device, non_blocking=True)
            else:
                lengths = torch.from_numpy(row_lengths)
                max_len = int(row_lengths.max())
                span = np.arange(max_len, dtype=np.int64)
                valid = span[None, :] < row_lengths[:, None]
                context = np.where(valid, span[None, :], 0)   # each row's positions, padded with position 0
                decode_slots = torch.from_numpy(self._slots(row_table, context)).to(device)
                if not valid.all():
                    decode_mask = torch.from_numpy(valid).view(1, num_rows, 1, max_len).to(device)
            row_slot_list = row_slots.tolist()
            first = 0
            for c in decodes + chains:
                n = 1 if c.tree is None else len(c.tree.tokens)
                slots_of[c] = row_slot_list[first: first + n]
                first += n
        prefill_chunks: list[attention.PrefillChunk] = []
        # Rows whose logits are kept: the last row of each chunk that yields a token first, then the trees' rows.
        keep: list[int] = []
        kept_last: list[ScheduledChunk] = []
        tree_keep: list[int] = []
        tree_rows: list[tuple[ScheduledChunk, int, int]] = []               # (chunk, first row in tree_keep, count)
        for row, c in enumerate(decodes):
            if c.yields_token:
                keep.append(row)
                kept_last.append(c)
        offset = len(decodes)
        for c in chains:
            n = len(c.tree.tokens)
            tree_rows.append((c, len(tree_keep), n))
            tree_keep.extend(range(offset, offset + n))
            offset += n
        hidden: list[int] = []
        hidden_chunks: list[tuple[ScheduledChunk, int, int]] = []
        scratch_used = 0
        for i, c in enumerate(others):
            row = table_array[len(decodes) + len(chains) + i]
            n = len(c.tree.tokens) if c.tree is not None else c.end - c.start
            scratch = c.tree is not None and not c.tree.in_place
            if scratch:  # guesses share positions: their keys/values go to scratch slots until accepted
                if scratch_used + n > self.cache.scratch_slots:
                    raise RuntimeError("the step's speculative rows exceed the KV cache's scratch slots")
                slots = torch.arange(n, dtype=torch.long) + self.cache.scratch_base + scratch_used
                scratch_used += n
            else:
                slots = torch.from_numpy(self._slots(row, position_array[offset: offset + n]))
            slot_parts.append(slots)
            slots_of[c] = slots.tolist()
            context_slots = mask = None
            if c.start > 0:
                context_slots = torch.cat([torch.from_numpy(self._slots(row, np.arange(c.start))), slots])
                if scratch:
                    tree_mask = torch.tensor(c.tree.mask, dtype=torch.bool)
                    mask = torch.cat([torch.ones(n, c.start, dtype=torch.bool), tree_mask], dim=1).to(device)
                context_slots = context_slots.to(device)
            tree_offsets = None if c.tree is None else torch.tensor(c.tree.offsets, dtype=torch.long).to(device)
            prefill_chunks.append(attention.PrefillChunk(offset, offset + n, c.start, context_slots, mask,
                                                         tree_offsets))
            if c.tree is not None:
                tree_rows.append((c, len(tree_keep), n))
                tree_keep.extend(range(offset, offset + n))
            elif c.yields_token:
                keep.append(offset + n - 1)
                kept_last.append(c)
            if c.want_hidden:
                hidden_chunks.append((c, len(hidden), n))
                hidden.extend(range(offset, offset + n))
            offset += n
        num_last = len(keep)
        keep.extend(tree_keep)
        attention.set_step_context(attention.StepContext(
            k_cache=self.cache.k, v_cache=self.cache.v, slot_mapping=torch.cat(slot_parts).to(device),
            num_decode=num_rows, decode_slots=decode_slots, decode_mask=decode_mask, prefills=prefill_chunks,
            decode_lengths=lengths, decode_tables=decode_tables, block_size=self.block_size))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        keep_rows = torch.tensor(keep, dtype=torch.long, device=device)
        hidden_rows = torch.tensor(hidden, dtype=torch.long, device=device) if hidden else None
        try:
            logits, states = self._run_model(input_ids, position_tensor.to(device), keep_rows, hidden_rows, num_layers)
        finally:
            attention.set_step_context(None)
        outputs = {c: ChunkOutput(range(0), slots_of[c]) for c in chunks}
        for row, c in enumerate(kept_last):
            outputs[c].rows = range(row, row + 1)
        for c, first, n in tree_rows:
            outputs[c].rows = range(num_last + first, num_last + first + n)
        for c, first, n in hidden_chunks:
            outputs[c].hidden = states[first: first + n]
        return StepOutput(logits, outputs)

    def _graph_step(self, decodes: list[ScheduledChunk], token_ids: list[int], positions: list[int]) -> StepOutput:
        """A plain decode step replayed from the CUDA graph of its batch size."""
        size = self.block_size
        tables = [c.seq.block_table for c in decodes]
        slots = [table[p // size] * size + p % size for table, p in zip(tables, positions)]
        logits = self.graphs.run(token_ids, positions, slots, tables)
        return StepOutput(logits, {c: ChunkOutput(range(i, i + 1), [slots[i]]) for i, c in enumerate(decodes)})

    def capture_graphs(self, max_rows: int) -> None:
        """GPUs: captures the decode step's CUDA graphs for up to max_rows rows (the engine's max_num_seqs)."""
        if self.use_graphs and self.paged_kernel and self.device.type == "cuda" and self.graphs is None:
            try:
                self.graphs = DecodeGraphs(self.fast, self.cache.k, self.cache.v, self.block_size,
                                           self.model_spec.max_context_length, max_rows, self.cache.scratch_base)
            except Exception:   # the engine still serves, every step eager (and says so)
                log.exception("capturing the decode CUDA graphs failed; decode steps run eagerly")

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, keep_rows: torch.Tensor,
                   hidden_rows: torch.Tensor | None, num_layers: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The packed row through the fast path or transformers -> (kept rows' logits, hidden_rows' states)."""
        if self.fast is not None:
            return self.fast(input_ids, positions, keep_rows, hidden_rows, num_layers)
        if num_layers is not None:
            raise RuntimeError("early-exit drafts need the Llama-family fast path")
        out = self.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                         logits_to_keep=keep_rows, output_hidden_states=hidden_rows is not None)
        states = out.hidden_states[-1][0].index_select(0, hidden_rows) if hidden_rows is not None else None
        return out.logits[0], states

    def commit(self, chunk: ScheduledChunk, out: StepOutput, kv_rows: list[int]) -> None:
        """Copies a tree's accepted rows' keys/values from its scratch slots to the sequence's positions
        chunk.start.. (an in-place tree's rows are already there)."""
        if chunk.tree is None or chunk.tree.in_place:
            return
        source = [out.chunks[chunk].slots[row] for row in kv_rows]
        table = np.array(chunk.seq.block_table, dtype=np.int64)
        target = torch.from_numpy(self._slots(table, np.arange(chunk.start, chunk.start + len(source))))
        self.cache.copy_slots(torch.tensor(source, dtype=torch.long, device=self.device), target.to(self.device))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Gives child (no blocks) parent's cached positions: full blocks shared, a partly filled one copied."""
        copy = self.blocks.fork(parent, child)
        if copy is not None:
            self.cache.copy_block(*copy, self.block_size)
