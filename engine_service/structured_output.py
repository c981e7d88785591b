"""Structured output: a sequence's constraint (JSON schema, any JSON object, regex, choice, grammar) compiled into
per-token masks, and one grammar matcher per sequence that follows its tokens.

The library is xgrammar, picked by measurement over llguidance on SmolLM2's 49,152-token vocabulary (2-core AVX2
CPU, one thread each, 2026-11-27; JSON schemas from 2 to 60 properties, with arrays, enums and patterns):
- computing one row's mask for a step: xgrammar 0.005-0.02 ms, llguidance 0.06-0.36 ms; 16 rows: xgrammar
  0.12-0.17 ms one after the other, llguidance 0.7-4.6 ms with its parallel fill. This runs inside every
  batched step, so it decides.
- compiling a schema: xgrammar 2-44 ms cold (about 0.5 s more for the first compile, which builds the vocabulary's
  tables; 2-20 s for 20-100 string properties with `pattern`s), llguidance 1.3-5 ms; both well under a
  millisecond from a cache. Compiles run off the step loop here and are cached, so the slower cold compile costs a
  request's time to first token, never the batch's.
- xgrammar pulls in triton (1 GB) for its CUDA kernels; the CPU image installs it without (deploy/Dockerfile).
- both roll back accepted tokens (speculative drafts), both copy a matcher (xgrammar `fork`: n > 1 beams), both
  allow the stop tokens only where the grammar may end. xgrammar reads EBNF (GBNF-like, root rule `root`).
Applying a mask (xgrammar's kernel, also on CUDA): ~0.16 ms per step at 1 row, ~3.2 ms at 16 rows on this CPU.

`Grammars` compiles constraints for the served model's vocabulary in a thread pool, off the step loop and off
the event loop, with a cache keyed by the constraint; `Matcher` is a sequence's grammar state; `mask_rows` is
what the sampler calls to forbid, per constrained row, every token the grammar refuses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from common.logs import clip, kv
from engine_service import metrics
from engine_service.sampling import StructuredOutput

if TYPE_CHECKING:
    from engine_service.sequence import Sequence

CompiledGrammar = xgr.CompiledGrammar
log = logging.getLogger("splitserve.engine")
COMPILE_CACHE_SIZE = 256          # compiled constraints kept (a JSON schema's tables take ~0.1-1 MB)
COMPILE_THREADS = 2
MAX_REASON_CHARS = 200
# xgrammar's messages start with a time, a source file and line, sometimes an internal check; users get the rest.
_INTERNALS = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class ConstraintError(ValueError):
    """A constraint that does not compile (INVALID_ARGUMENT); the message names the field and the reason."""


def _reason(exc: Exception) -> str:
    """The library's message without its internals (source paths, checks), on one line, clipped."""
    text = _INTERNALS.sub("", str(exc)).strip().splitlines()
    return clip(text[0] if text else "it does not compile", MAX_REASON_CHARS)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose root is exactly one of the choices (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class Grammars:
    """Compiles constraints for one model's vocabulary. `compile` runs on the event loop and awaits the work in a
    thread pool; the vocabulary's tables are built there too, on the first constrained request."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        # Both touched on the event loop only: the compiled constraints, and the compiles under way (a burst of
        # requests with one schema compiles it once).
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._pending: dict[StructuredOutput, asyncio.Future[CompiledGrammar]] = {}

    async def compile(self, constraint: StructuredOutput) -> CompiledGrammar:
        """The compiled constraint; raises ConstraintError naming the field when it does not compile."""
        metrics.STRUCTURED_REQUESTS.labels(kind=constraint.kind).inc()
        compiled = self._cache.get(constraint)
        if compiled is not None:
            self._cache.move_to_end(constraint)
            metrics.STRUCTURED_COMPILE_CACHE_HITS.inc()
            return compiled
        pending = self._pending.get(constraint)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._executor, self._compile, constraint)
            self._pending[constraint] = pending
            try:
                compiled = await asyncio.shield(pending)
            finally:
                self._pending.pop(constraint, None)
            self._cache[constraint] = compiled
            while len(self._cache) > COMPILE_CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled
        return await asyncio.shield(pending)

    def matcher(self, compiled: CompiledGrammar, replayed: Iterable[int] = ()) -> Matcher:
        """A fresh grammar state, advanced over `replayed` (a failover's tokens, generated under the same
        constraint by the engine that was lost); ConstraintError when they do not satisfy it."""
        matcher = Matcher(xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids), self.vocab_size)
        if not all(matcher.accept(token) for token in replayed):
            matcher.close()
            raise ConstraintError("replayed_tokens do not satisfy the request's structured_output constraint")
        return matcher

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the compile threads ------------------------------------------------------------------------------------------
    def _compiler_for_vocabulary(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                # Our cache is the one (keyed by the constraint); one thread per compile: the step loop needs the rest.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, constraint: StructuredOutput) -> CompiledGrammar:
        compiler = self._compiler_for_vocabulary()
        started = time.perf_counter()
        kind, value = constraint.kind, constraint.value
        try:
            if kind == "json_schema":
                # Compact JSON (no free whitespace): a model cannot stall in an endless run of spaces.
                compiled = compiler.compile_json_schema(value, any_whitespace=False)
            elif kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(value)
            elif kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(value))
            else:
                compiled = compiler.compile_grammar(value)
        except Exception as exc:   # the library raises RuntimeError (and a few others) for what it cannot read
            raise ConstraintError(f"structured_output.{_field(kind)}: {_reason(exc)}") from None
        metrics.STRUCTURED_COMPILE_SECONDS.observe(time.perf_counter() - started)
        if self.matcher(compiled).close_at_dead_end():
            raise ConstraintError(f"structured_output.{_field(kind)}: this model's vocabulary cannot write the text "
                                  f"it starts with (a character no token holds)")
        return compiled


def _field(kind: str) -> str:
    return "choice.choices" if kind == "choice" else kind


class Matcher:
    """A sequence's grammar state: where its tokens so far leave the constraint. Made where the request is queued,
    then used by the step loop only."""
    live = 0        # matchers not yet closed, over the whole engine (a gauge: they come back when sequences end)
    _live_lock = threading.Lock()   # made on the servicer's thread, closed on the step loop's

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        with Matcher._live_lock:
            Matcher.live += 1

    def accept(self, token: int) -> bool:
        """Advances by one token; False (and unchanged) when the grammar refuses it."""
        return self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """A stop token was accepted where the grammar may end: the sequence is complete."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int, ahead: list[int]) -> None:
        """Writes into bitmask[row] the tokens allowed after `ahead` (draft tokens not yet accepted), leaving the
        state as it was. Past a draft the grammar refuses, the mask is the one after the drafts it accepts (that
        row's token is never kept: its draft was not). At a dead end (the grammar goes on only with characters
        no token of this vocabulary holds) the stop tokens are allowed: the sequence ends there."""
        accepted = 0
        for token in ahead:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                break
            accepted += 1
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if accepted:
            self._matcher.rollback(accepted)
        if not bool(bitmask[row].any()):
            for token in self._matcher.stop_token_ids:
                bit = 1 << (token % 32)
                bitmask[row, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit   # int32 words

    @property
    def dead_end(self) -> bool:
        """No token continues the text from here (and the grammar may not end here)."""
        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
        self._matcher.fill_next_token_bitmask(bitmask, 0)
        return not bool(bitmask.any())

    def close_at_dead_end(self) -> bool:
        """Closes the matcher; whether it was at a dead end (a compile's check of the start)."""
        stuck = self.dead_end
        self.close()
        return stuck

    def fork(self) -> Matcher:
        """An independent copy of the state (a beam that branches)."""
        return Matcher(self._matcher.fork(), self._vocab_size)

    def close(self) -> None:
        with Matcher._live_lock:
            Matcher.live -= 1
        self._matcher = None


def finish_reason(seq: Sequence, token: int, eos_token_ids: tuple[int, ...] | list[int]) -> str:
    """Advances seq's matcher by its new token: "stop" when the constraint is complete (a stop token where the
    grammar may end, even with ignore_eos) or cannot go on in this vocabulary, "error" when the grammar refuses a
    token (the mask allows only what it accepts: a bug, never the user's), else ""."""
    if seq.matcher.accept(token):
        return "stop" if seq.matcher.terminated else ""
    if token in eos_token_ids and seq.matcher.dead_end:
        # The grammar goes on only with characters no token holds: the mask let the sequence end here.
        log.warning("constraint cannot be continued in this vocabulary %s", kv(request_id=seq.request_id))
        return "stop"
    log.error("constrained token refused by its grammar %s", kv(request_id=seq.request_id, token=token))
    return "error"


def close_matchers(seqs: Iterable[Sequence]) -> None:
    """Gives back the matchers of these sequences (a request's own and its beams' or completions')."""
    for seq in seqs:
        if seq.matcher is not None:
            seq.matcher.close()
            seq.matcher = None


def mask_rows(logits: torch.Tensor, seqs: list[Sequence], ahead: list[list[int]]) -> torch.Tensor:
    """logits [rows, vocab] float32 with -inf, in the rows of constrained sequences, wherever their grammar (after
    ahead[row]) refuses the token; a new tensor when any row is constrained, else logits itself."""
    rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    started = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])
    for i in rows:
        seqs[i].matcher.fill(bitmask, i, ahead[i])
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device, non_blocking=True), indices=rows)
    metrics.STRUCTURED_MASK_SECONDS.observe(time.perf_counter() - started)
    return masked
