"""The step loop: one thread that schedules, runs the model, samples and delivers tokens, step after step.

Other threads talk to it only through `add_request` and `abort`, which post commands to an inbox; the loop
drains the inbox between steps, so the scheduler and the cache are only ever touched by the loop thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from common.logs import kv
from engine_service import metrics
from engine_service.model_runner import ModelRunner, in_place
from engine_service.drafting import chain
from engine_service.sampler import Sampler
from engine_service.strategies import BeamGroup, Speculative, make_strategy
from engine_service.sampling import SamplingParams
from engine_service.scheduler import ScheduledChunk, Scheduler
from engine_service.sequence import OutputCallback, Sequence, SequenceStatus, TokenLogprobs

log = logging.getLogger("splitserve.engine")


class RequestError(ValueError):
    """A request the engine cannot take as it is (the servicer answers INVALID_ARGUMENT)."""


class EngineFullError(RuntimeError):
    """The waiting queue is full (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int


class Engine:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, draft_layers: int = 0) -> None:
        """The runner owns the KV cache and its block manager; the scheduler decides over its blocks.
        draft_layers > 0: speculative "draft" requests draft with the target's first draft_layers layers (-1: a
        quarter of them; Llama-family fast path only)."""
        self.runner = runner
        num_layers = len(runner.fast.layers) if runner.fast is not None else 0
        self.draft_layers = min(num_layers // 4 if draft_layers < 0 else draft_layers, num_layers - 1)
        self.draft_layers = max(0, self.draft_layers)
        self.spec_draft_tokens = 0          # guesses verified / accepted by speculative and lookahead steps
        self.spec_accepted_tokens = 0
        self.spec = runner.spec
        self.scheduler = Scheduler(runner.blocks, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler(runner.device)
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._live: dict[str, Sequence] = {}      # owned by the loop thread
        self._pending = 0                         # requests posted but not yet taken by the loop
        self._pending_lock = threading.Lock()
        self._reported = (0, 0, 0, 0, 0)     # counters already exported to Prometheus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)

    # -- called from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    on_output: OutputCallback) -> Sequence:
        """Queues a sequence; on_output is called from the loop thread with each new token and the finish.

        The returned sequence belongs to the loop thread: callers may read its timings once a token arrived.
        """
        params.validate()
        if not prompt_ids:
            raise RequestError("the prompt has no tokens")
        vocab = self.spec.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        context = self.spec.max_context_length
        if len(prompt_ids) >= context:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens, "
                f"which leaves no room for output")
        stats = self.stats()
        with self._pending_lock:
            if stats.waiting + self._pending >= self.max_waiting:
                raise EngineFullError(f"the engine's waiting queue is full ({self.max_waiting} requests)")
            self._pending += 1
        try:
            strategy = make_strategy(params, context, self.draft_layers, self.spec.eos_token_ids, len(prompt_ids))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, on_output=on_output,
                       strategy=strategy)
        if isinstance(strategy, BeamGroup):
            strategy.leader = seq
        self._inbox.put(("add", seq))
        return seq

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_blocks_total=blocks.num_blocks, kv_blocks_used=blocks.num_used)

    # -- the loop thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.scheduler.has_work()
            try:
                self._drain_inbox(block)
                if self.scheduler.has_work():
                    self.step()
            except Exception:  # a bug outside the forward pass must not kill the engine: keep serving
                log.exception("engine loop error; failing the running sequences")
                for seq in list(self.scheduler.running):
                    self._finish(seq, "error")
            self._publish_gauges()
        for seq in list(self._live.values()):
            self._finish(seq, "abort")

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                command, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if command == "add":
                assert isinstance(payload, Sequence)
                with self._pending_lock:
                    self._pending -= 1
                if payload.request_id in self._live:
                    payload.on_output([], "abort", [])
                    log.warning("duplicate request id %s", kv(request_id=payload.request_id))
                    continue
                self._live[payload.request_id] = payload
                self.scheduler.add(payload)
            elif command == "abort":
                seq = self._live.get(str(payload))
                if seq is not None:
                    self._finish(seq, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        started = time.perf_counter()
        try:
            self._run(chunks)
        except Exception:
            # Find the sequences that fail on their own; they end with "error", the rest of the batch goes on.
            log.exception("engine step failed; retrying its %d sequences one by one", len(chunks))
            for chunk in chunks:
                try:
                    self._run([chunk])
                except Exception as exc:
                    log.error("sequence failed %s", kv(request_id=chunk.seq.request_id, error=repr(exc)))
                    self._finish(chunk.seq, "error")
        metrics.STEP_SECONDS.labels(kind=_step_kind(chunks)).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(chunks))

    def _run(self, chunks: list[ScheduledChunk]) -> None:
        """One forward pass over the chunks, then sampling and delivery. Writing a chunk's keys/values again
        is harmless, so a failed batch can be rerun piecewise."""
        chunks = self._plan(chunks)
        logits, sampling = self.runner.forward(chunks)
        plain = [i for i, c in enumerate(sampling) if not _consumes_prefill(c.seq)]
        sampled = None
        if plain:
            rows = logits if len(plain) == len(sampling) else logits[plain]
            sampled = self.sampler(rows, [sampling[i].seq for i in plain])
        beam_rows: dict[int, tuple[BeamGroup, list[int]]] = {}
        for i, c in enumerate(sampling):
            if isinstance(c.seq.strategy, BeamGroup):
                beam_rows.setdefault(id(c.seq.strategy), (c.seq.strategy, []))[1].append(i)
        for c in chunks:
            c.seq.num_steps += 1
            if c.tree is not None:
                continue
            strategy = c.seq.strategy
            if strategy is not None and strategy.wants_hidden:
                row = next((i for i, s in enumerate(sampling) if s is c), None)   # the prompt's last chunk
                strategy.after_prefill(c.seq, None if row is None else logits[row], c.hidden, c.start)
            c.seq.num_computed = c.end
            self.scheduler.blocks.register_full_blocks(c.seq)
        now = time.perf_counter()
        if sampled is not None:
            for i, token, logprobs in zip(plain, sampled.tokens, sampled.logprobs):
                self._append_token(sampling[i].seq, token, now, logprobs)
        for c in chunks:
            if c.tree is not None:
                self._accept_tree(c, now)
        for group, rows in beam_rows.values():
            self._beam_step(group, logits[rows], [sampling[i].seq for i in rows], now)

    def _plan(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """Gives each strategy step its rows (a DraftTree); returns the chunks that run this step."""
        drafting: list[ScheduledChunk] = []
        scratch_free = self.runner.cache.scratch_slots
        planned: list[ScheduledChunk] = []
        for c in chunks:
            strategy = c.seq.strategy
            if strategy is None:
                planned.append(c)
                continue
            c.want_hidden = strategy.wants_hidden
            if not strategy.span(c.seq):
                planned.append(c)
                continue
            if isinstance(strategy, BeamGroup):
                beams = strategy.beams
                needed = sum(self.scheduler.blocks.blocks_needed(b, b.num_computed + 1) for b in beams)
                if needed > self.scheduler.blocks.num_free:
                    continue    # the group waits for free blocks
                for beam in beams:
                    self.scheduler.blocks.allocate(beam, beam.num_computed + 1)
                    planned.append(ScheduledChunk(beam, beam.num_computed, beam.num_computed + 1))
                continue
            if isinstance(strategy, Speculative) and strategy.mode == "draft":
                drafting.append(c)
                planned.append(c)
                continue
            c.tree = strategy.plan(c.seq, self.sampler)
            if c.tree is not None and not in_place(c.tree):
                if len(c.tree.tokens) > scratch_free:   # the scratch slots are full: this one waits a step
                    c.tree = None
                    if strategy.consumes_prefill:
                        continue
                else:
                    scratch_free -= len(c.tree.tokens)
            planned.append(c)
        if drafting:
            self._draft(drafting)
            for c in drafting:
                c.tree = c.seq.strategy.plan(c.seq, self.sampler)
        return planned

    def _draft(self, chunks: list[ScheduledChunk]) -> None:
        """The draft model's guesses: up to k early-exit forward passes (the target's first layers), batched over
        the sequences, each writing its guess's keys/values of those layers in place."""
        for c in chunks:
            c.seq.strategy.drafts = []
            c.seq.strategy.draft_probs = None
        probs: dict[int, list[torch.Tensor]] = {id(c): [] for c in chunks}
        for step in range(max(c.seq.strategy.max_drafts(c.seq) for c in chunks)):
            active = [c for c in chunks if c.seq.strategy.max_drafts(c.seq) > step]
            mini = [ScheduledChunk(c.seq, c.start + step, c.start + step + 1,
                                   tree=chain(([c.seq.output_ids[-1]] + c.seq.strategy.drafts)[-1], []))
                    for c in active]
            self.runner.forward(mini, num_layers=self.draft_layers)
            rows = torch.cat([m.logits for m in mini])
            processed = self.sampler.process(rows, [c.seq for c in active],
                                             [list(c.seq.strategy.drafts) for c in active])
            greedy = [c.seq.params.greedy for c in active]
            argmax = processed.argmax(dim=-1).tolist()
            distribution = processed.softmax(dim=-1)
            for i, c in enumerate(active):
                strategy = c.seq.strategy
                if greedy[i]:
                    strategy.drafts.append(argmax[i])
                else:
                    strategy.drafts.append(self.sampler.draw(distribution[i: i + 1], [c.seq])[0])
                    probs[id(c)].append(distribution[i])
        for c in chunks:
            if probs[id(c)]:
                c.seq.strategy.draft_probs = torch.stack(probs[id(c)])

    def _beam_step(self, group: BeamGroup, logits: torch.Tensor, seqs: list[Sequence], now: float) -> None:
        """Feeds the live beams' (or, first, the prompt's) logits to the search; forks, extends and frees beams."""
        leader = group.leader
        assert leader is not None
        if seqs == [leader]:
            if group.started:
                return    # the leader recomputed its prompt after a preemption: the beams already exist
            group.started = True
        # As generate: the processors (penalties, bias) act on the log-probabilities.
        step = group.search.step(self.sampler.process(logits.float().log_softmax(dim=-1), seqs))
        blocks = self.scheduler.blocks
        parents = group.beams or [leader]
        if step.done:
            group.release(blocks)
            for token in group.search.best():
                self._append_token(leader, token, now)
                if leader.is_finished:
                    return
            self._finish(leader, "length")
            return
        reused: set[int] = set()
        beams: list[Sequence] = []
        for index, token in zip(step.parents, step.tokens):
            parent = parents[index]
            if parent is not leader and index not in reused:
                reused.add(index)     # the first child continues its parent's blocks; the others copy them
                beams.append(parent)
                continue
            child = Sequence(request_id=f"{leader.request_id}#beam", prompt_ids=leader.prompt_ids,
                             params=leader.params, on_output=leader.on_output, output_ids=list(parent.output_ids),
                             status=SequenceStatus.RUNNING, strategy=group)
            copy = blocks.fork(parent, child)
            if copy is not None:
                self.runner.cache.copy_block(*copy, blocks.block_size)
            beams.append(child)
        for index, parent in enumerate(parents):
            if parent is not leader and index not in reused:
                blocks.free(parent)
        for beam, token in zip(beams, step.tokens):
            beam.output_ids.append(token)
        group.beams = beams

    def _accept_tree(self, c: ScheduledChunk, now: float) -> None:
        seq, strategy = c.seq, c.seq.strategy
        result = strategy.accept(seq, c.tree, c.logits, c.hidden, self.sampler)
        if not in_place(c.tree):
            self.runner.commit([c.slots[row] for row in result.kv_rows], seq.block_table, c.start)
        if result.drafted:
            self.spec_draft_tokens += result.drafted
            self.spec_accepted_tokens += len(result.tokens) - 1
        for token, logprobs in zip(result.tokens, result.logprobs):
            self._append_token(seq, token, now, logprobs)
            if seq.is_finished:
                return
        seq.num_computed = c.start + len(result.kv_rows)
        self.scheduler.blocks.register_full_blocks(seq)

    def _append_token(self, seq: Sequence, token: int, now: float, logprobs: TokenLogprobs | None = None) -> None:
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        reason = ""
        if (not params.ignore_eos and token in self.spec.eos_token_ids) or token in params.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.spec.max_context_length:
            reason = "length"
        lp = [logprobs] if logprobs is not None else []
        if reason:
            self._finish(seq, reason, [token], lp)
        else:
            seq.on_output([token], "", lp)

    def _finish(self, seq: Sequence, reason: str, last_tokens: list[int] | None = None,
                logprobs: list[TokenLogprobs] | None = None) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        self.scheduler.finish(seq, reason)
        if isinstance(seq.strategy, BeamGroup):
            seq.strategy.release(self.scheduler.blocks)
        self._live.pop(seq.request_id, None)
        metrics.REQUESTS_FINISHED.labels(finish_reason=reason).inc()
        seq.on_output(last_tokens or [], reason, logprobs or [])

    def _publish_gauges(self) -> None:
        stats = self.stats()
        metrics.REQUESTS_RUNNING.set(stats.running)
        metrics.REQUESTS_WAITING.set(stats.waiting)
        metrics.KV_CACHE_USAGE.set(stats.kv_blocks_used / max(1, stats.kv_blocks_total))
        counters = (self.scheduler.num_preemptions, self.scheduler.prefix_queried_tokens,
                    self.scheduler.prefix_hit_tokens, self.spec_draft_tokens, self.spec_accepted_tokens)
        exported = (metrics.PREEMPTIONS, metrics.PREFIX_CACHE_QUERIES, metrics.PREFIX_CACHE_HITS,
                    metrics.SPEC_DRAFT_TOKENS, metrics.SPEC_ACCEPTED_TOKENS)
        for counter, now, before in zip(exported, counters, self._reported):
            if now > before:
                counter.inc(now - before)
        self._reported = counters


def _consumes_prefill(seq: Sequence) -> bool:
    return seq.strategy is not None and seq.strategy.consumes_prefill


def _step_kind(chunks: list[ScheduledChunk]) -> str:
    decodes = sum(1 for c in chunks if c.is_decode)
    if decodes == len(chunks):
        return "decode"
    return "prefill" if decodes == 0 else "mixed"
