"""Plain decode steps on GPUs replayed from CUDA graphs, one captured per batch size (as vLLM and gpt-fast do).

A small model's decode step is a few hundred kernel launches of microseconds each: launched one by one from
Python, the GPU waits on the host. A graph captured once per batch size replays them all in one launch. The graph
reads its inputs from static device buffers (token ids, positions, new-token slots, block tables, context lengths);
a step copies its own values in (one host-to-device copy from one pinned buffer), replays the smallest graph of at
least its rows, and reads the logits of its rows. Rows past the step's own are padding: they attend one cached
token and write their key/value to a scratch slot nobody reads.

The forward pass captured is FastLlama's own (the same code as an eager step), with the paged decode kernel
(paged_decode) for attention: its loop bound is read on the device, so one graph serves every context length up
to the graph's block-table width.
"""
from __future__ import annotations

import logging
import time

import torch

from common.logs import kv
from engine_service.model import attention
from engine_service.model.llama import FastLlama

log = logging.getLogger("splitserve.engine.graphs")
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_CONTEXT = 16384   # the graphs' block tables cover this many tokens; longer contexts step eagerly


class DecodeGraphs:
    def __init__(self, fast: FastLlama, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], block_size: int,
                 max_context: int, max_rows: int, pad_slot: int) -> None:
        self.block_size = block_size
        self.width = -(-min(max_context, MAX_CONTEXT) // block_size)      # block-table columns
        self.sizes = [b for b in BATCH_SIZES if b < max_rows] + [max_rows]
        self.max_rows = max_rows
        self.pad_slot = pad_slot
        device = k_cache[0].device
        # One int64 buffer for every input, so a step is one copy: [ids | positions | slots | lengths | tables].
        self.fields = 4 * max_rows
        size = self.fields + max_rows * self.width
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=True)
        self.array = self.host.numpy()
        self.inputs = torch.zeros(size, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event()
        self._reset_host()
        self.inputs.copy_(self.host)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Device tensors a graph reads that are not views of self.inputs: they must live as long as the graphs (a
        # freed one's memory goes back to the allocator, and a replay would read whatever is written there next).
        self._static: list[torch.Tensor] = []
        started = time.perf_counter()
        pool = None
        for rows in sorted(self.sizes, reverse=True):     # the largest first: the others reuse its memory
            run = self._step_function(fast, k_cache, v_cache, rows)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run()                                    # compiles the kernels, settles the allocator
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = run()
            pool = graph.pool()
            self.graphs[rows] = (graph, logits)
        torch.cuda.synchronize()
        log.info("decode graphs captured %s", kv(batch_sizes=self.sizes, context=self.width * block_size,
                                                 seconds=round(time.perf_counter() - started, 1)))

    def _views(self, rows: int) -> dict[str, torch.Tensor]:
        m = self.max_rows
        b = self.inputs
        return {"ids": b[:rows], "positions": b[m: m + rows], "slots": b[2 * m: 2 * m + rows],
                "lengths": b[3 * m: 3 * m + rows],
                "tables": b[self.fields: self.fields + rows * self.width].view(rows, self.width)}

    def _step_function(self, fast: FastLlama, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], rows: int):
        views = self._views(rows)
        keep = torch.arange(rows, device=self.inputs.device)
        self._static.append(keep)
        context = attention.StepContext(
            k_cache=k_cache, v_cache=v_cache, slot_mapping=views["slots"], num_decode=rows, decode_slots=None,
            decode_mask=None, prefills=[], decode_lengths=views["lengths"], decode_tables=views["tables"],
            block_size=self.block_size)

        def run() -> torch.Tensor:
            attention.set_step_context(context)
            try:
                return fast(views["ids"], views["positions"], keep)[0]
            finally:
                attention.set_step_context(None)
        return run

    def _reset_host(self) -> None:
        """Padding rows: token 0 at position 0, attending one token through block 0, writing to the pad slot."""
        m = self.max_rows
        self.array[: 2 * m] = 0
        self.array[2 * m: 3 * m] = self.pad_slot
        self.array[3 * m: 4 * m] = 1

    def fits(self, rows: int, table_length: int) -> bool:
        return rows <= self.max_rows and table_length <= self.width

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]
            ) -> torch.Tensor:
        """One decode step of len(token_ids) rows (fits() said so) -> logits [rows, vocab] (a copy: the next
        replay overwrites the graph's own)."""
        rows = len(token_ids)
        size = next(b for b in self.sizes if b >= rows)
        m, width = self.max_rows, self.width
        self.copied.synchronize()          # the last step's copy has read the host buffer
        self._reset_host()
        host = self.array
        host[:rows] = token_ids
        host[m: m + rows] = positions
        host[2 * m: 2 * m + rows] = slots
        host[3 * m: 3 * m + rows] = positions
        host[3 * m: 3 * m + rows] += 1
        table = host[self.fields: self.fields + size * width].reshape(size, width)
        # Columns past a row's own blocks keep stale block ids: valid ones, never read (a row reads its length).
        for row, blocks in enumerate(tables):
            table[row, : len(blocks)] = blocks
        end = self.fields + size * width
        self.inputs[:end].copy_(self.host[:end], non_blocking=True)
        self.copied.record()
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:rows].clone()
