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
from engine_service.model_runner import ModelRunner
from engine_service.sampler import Sampler
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
                 max_waiting: int) -> None:
        """The runner owns the KV cache and its block manager; the scheduler decides over its blocks."""
        self.runner = runner
        self.spec = runner.spec
        self.scheduler = Scheduler(runner.blocks, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler(runner.device)
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._live: dict[str, Sequence] = {}      # owned by the loop thread
        self._pending = 0                         # requests posted but not yet taken by the loop
        self._pending_lock = threading.Lock()
        self._reported = (0, 0, 0)           # counters already exported to Prometheus
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
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, on_output=on_output)
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
        logits, sampling = self.runner.forward(chunks)
        sampled = self.sampler(logits, [c.seq for c in sampling]) if sampling else None
        for c in chunks:
            c.seq.num_computed = c.end
            self.scheduler.blocks.register_full_blocks(c.seq)
        now = time.perf_counter()
        if sampled is not None:
            for c, token, logprobs in zip(sampling, sampled.tokens, sampled.logprobs):
                self._append_token(c.seq, token, now, logprobs)

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
        self._live.pop(seq.request_id, None)
        metrics.REQUESTS_FINISHED.labels(finish_reason=reason).inc()
        seq.on_output(last_tokens or [], reason, logprobs or [])

    def _publish_gauges(self) -> None:
        stats = self.stats()
        metrics.REQUESTS_RUNNING.set(stats.running)
        metrics.REQUESTS_WAITING.set(stats.waiting)
        metrics.KV_CACHE_USAGE.set(stats.kv_blocks_used / max(1, stats.kv_blocks_total))
        counters = (self.scheduler.num_preemptions, self.scheduler.prefix_queried_tokens,
                    self.scheduler.prefix_hit_tokens)
        for counter, now, before in zip((metrics.PREEMPTIONS, metrics.PREFIX_CACHE_QUERIES, metrics.PREFIX_CACHE_HITS),
                                        counters, self._reported):
            if now > before:
                counter.inc(now - before)
        self._reported = counters


def _step_kind(chunks: list[ScheduledChunk]) -> str:
    decodes = sum(1 for c in chunks if c.is_decode)
    if decodes == len(chunks):
        return "decode"
    return "prefill" if decodes == 0 else "mixed"
