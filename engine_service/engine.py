"""The step loop: one thread that runs step after step over all live sequences.

A step: the scheduler picks the chunks (decodes first, then prompt chunks) -> each decoding strategy plans its
chunks (engine_service.decoding) -> the model runner computes them in one forward pass (a StepOutput) -> each
strategy accepts its chunks' outputs -> the engine delivers the new tokens and ends the sequences that finish.
Other threads talk to the loop only through `add_request`, `abort` and `call_in_loop` (a decode engine receiving
a prompt's KV cache: engine_service.kv_transfer), which post to its inbox.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from common.logs import kv
from engine_service import metrics
from engine_service.decoding import by_strategy, grouped
from engine_service.decoding.base import StepResult
from engine_service.inbox import EngineFullError, Inbox
from engine_service.intake import Intake
from engine_service.model_runner import ModelRunner, StepOutput
from engine_service.sampler import Sampler
from engine_service.sampling import SamplingParams
from engine_service.scheduler import EngineStats, ScheduledChunk, Scheduler
from engine_service.sequence import OutputCallback, Sequence, SequenceOutput, SequenceStatus, TokenLogprobs
from engine_service.structured_output import Grammars, Matcher, close_matchers, finish_reason

__all__ = ["Engine", "EngineFullError", "EngineStats"]
log = logging.getLogger("splitserve.engine")


class Engine:
    """The step loop; also the `Step` (engine_service.decoding.base) the strategies deliver their tokens through."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, draft_layers: int = 0) -> None:
        """The runner owns the KV cache and its block manager; the scheduler decides over its blocks. draft_layers:
        see Intake.draft_layers."""
        self.runner = runner
        self.model_spec = runner.model_spec
        self.scheduler = Scheduler(runner.blocks, max_num_seqs, max_num_batched_tokens, runner.cache.scratch_slots)
        runner.capture_graphs(max_num_seqs)
        self.sampler = Sampler(runner.device)
        self.grammars = Grammars(runner.model_path, self.model_spec.vocab_size, self.model_spec.eos_token_ids)
        self.intake = Intake(self.model_spec, max_num_seqs, runner.draft_layers(draft_layers), self.grammars)
        self.forward, self.fork, self.free = runner.forward, runner.fork, self.scheduler.blocks.free   # Step's
        self.guesses_verified = 0           # guessed tokens that speculative and lookahead steps verified
        self.guesses_accepted = 0           # tokens those steps produced beyond the first
        self._inbox = Inbox(max_waiting)
        self.live: dict[str, Sequence] = {}       # by request id; owned by the loop thread
        self._exporter = metrics.Exporter()
        self._now = 0.0                      # when this step's forward pass ended: its tokens' time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)

    # -- called from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.wake()
        self._thread.join(timeout=10)
        self.grammars.shutdown()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    on_output: OutputCallback) -> Sequence:
        """Checks and queues a request (intake.sequence, then add_sequence); on_output is called from the loop
        thread with each new token and the finish. The sequence belongs to the loop thread: read it once finished."""
        seq = self.intake.sequence(request_id, prompt_ids, params, on_output)
        self.add_sequence(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queues a sequence made by intake.sequence. Raises EngineFullError."""
        try:
            self._inbox.add(seq, len(self.scheduler.waiting))
        except EngineFullError:
            close_matchers([seq])
            raise

    def call_in_loop(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Runs function(*args) on the loop thread, between steps; its result or exception in the future."""
        return self._inbox.call(function, *args)

    def abort(self, request_id: str) -> None:
        self._inbox.abort(request_id)

    def stats(self) -> EngineStats:
        return replace(self.scheduler.stats(), matchers=Matcher.live)

    # -- the loop thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox(block=not self.scheduler.has_work())
                if self.scheduler.has_work():
                    self.step()
            except Exception:  # a bug outside the forward pass must not kill the engine: keep serving
                log.exception("engine loop error; failing the running sequences")
                for seq in list(self.scheduler.running):
                    self.finish(seq, "error")
            self._publish_metrics()
        for seq in list(self.live.values()):
            self.finish(seq, "abort")

    def _drain_inbox(self, block: bool) -> None:
        for command, payload in self._inbox.take(block):
            if command == "add":
                assert isinstance(payload, Sequence)
                if payload.request_id in self.live:
                    close_matchers([payload])
                    payload.on_output(SequenceOutput([], "abort"))
                    log.warning("duplicate request id %s", kv(request_id=payload.request_id))
                    continue
                self.live[payload.request_id] = payload
                self.scheduler.add(payload)
            elif command == "abort" and (seq := self.live.get(str(payload))) is not None:
                self.finish(seq, "abort")
            elif command == "call":
                payload()

    @torch.inference_mode()
    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        started = time.perf_counter()
        try:
            self._run(chunks)
        except Exception:
            # Find the requests that fail on their own; they end with "error", the rest of the batch goes on. (A
            # request's chunks go together: its beams share its id.) Writing keys/values again is harmless.
            log.exception("engine step failed; retrying its requests one by one")
            for request_id, request_chunks in grouped(chunks, lambda c: c.seq.request_id).items():
                try:
                    self._run(request_chunks)
                except Exception as exc:
                    log.error("sequence failed %s", kv(request_id=request_id, error=repr(exc)))
                    self.finish(self.live.get(request_id, request_chunks[0].seq), "error")
        metrics.observe_step(sum(1 for c in chunks if c.is_decode), len(chunks), time.perf_counter() - started)

    def _run(self, chunks: list[ScheduledChunk]) -> None:
        """plan -> forward -> accept, each strategy over its own chunks at once."""
        planned = [c for kind, group in by_strategy(chunks).items() for c in kind.plan(group, self)]
        if not planned:
            return
        out = self.runner.forward(planned)
        self._now = time.perf_counter()
        for c in planned:
            c.seq.num_steps += 1
            if c.tree is None:
                self._advance(c.seq, c.end)
        for kind, group in by_strategy(planned).items():
            kind.accept(group, out, self)

    def _advance(self, seq: Sequence, num_computed: int) -> None:
        seq.num_computed = num_computed
        self.scheduler.blocks.register_full_blocks(seq)
        if seq.export is not None:   # a prefill engine sends each chunk's full blocks as soon as they are computed
            seq.export.computed(seq, self.runner.cache, final=False)

    # -- the Step the strategies act through (with forward, fork and free) --------------------------------------
    def emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs | None] | None = None) -> None:
        for i, token in enumerate(tokens):
            self._append_token(seq, token, logprobs[i] if logprobs else None)
            if seq.is_finished:
                return

    def keep(self, chunk: ScheduledChunk, out: StepOutput, result: StepResult) -> None:
        self.runner.commit(chunk, out, result.kv_rows)
        if result.guesses:
            self.guesses_verified += result.guesses
            self.guesses_accepted += len(result.tokens) - 1
        self.emit(chunk.seq, result.tokens, result.logprobs)
        if not chunk.seq.is_finished:
            self._advance(chunk.seq, chunk.start + len(result.kv_rows))

    def finish(self, seq: Sequence, reason: str, output: SequenceOutput | None = None) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.export is not None and reason in ("stop", "length"):   # the rest, before the blocks are freed
            seq.export.computed(seq, self.runner.cache, final=True)
        close_matchers([seq, *seq.strategy.members(seq)])
        self.scheduler.finish(seq, reason)
        self.live.pop(seq.request_id, None)
        metrics.REQUESTS_FINISHED.labels(finish_reason=reason).inc()
        seq.on_output(output or SequenceOutput([], reason))

    def join_running(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        """(Loop thread.) seq's prompt is in the cache (its KV blocks received): its first token, computed
        elsewhere, goes out now; it joins the running batch once the batch has a place (max_num_seqs)."""
        self.scheduler.join_running(seq)
        self._now = time.perf_counter()
        self._append_token(seq, token, logprobs)

    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        spec = self.model_spec
        output = seq.append_token(token, logprobs, self._now, spec.eos_token_ids, spec.max_context_length)
        if seq.matcher is not None and (reason := finish_reason(seq, token, spec.eos_token_ids)):
            output = replace(output, finish_reason=reason)
        if output.finish_reason:
            self.finish(seq, output.finish_reason, output)
        else:
            seq.on_output(output)

    def _publish_metrics(self) -> None:
        s = self.scheduler
        self._exporter.publish(self.stats(), (s.num_preemptions, s.prefix_queried_tokens, s.prefix_hit_tokens,
                                              self.guesses_verified, self.guesses_accepted))
