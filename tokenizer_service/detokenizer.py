"""Incremental detokenization: generated ids in, text deltas out, never a broken UTF-8 character.

The invariant: the deltas of one stream, concatenated, equal transformers' `decode(ids, skip_special_tokens=True)`
for all ids fed (the backend's decode, then clean_up_tokenization_spaces where the model asks for it).

Most tokenizers (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM2) go through the `tokenizers` library's
`DecodeStream`, which vLLM also uses: one Rust call per piece, and it holds back a character split across tokens.
It cannot do two things, which keep our own window below:
- SentencePiece byte fallback (`<0xE4>` tokens): the decoder turns a whole run of them into U+FFFDs when the run
  turns out invalid, so text DecodeStream already sent (a valid character early in the run) would change;
- clean_up_tokenization_spaces, a transformers step after the backend's decode (" ." becomes "." only once the
  "." arrives).

Our window, as in vLLM's own detokenizer: re-decoding the whole output per token would cost O(n^2), so each step
decodes only `ids[prefix_offset:]` and emits what it adds over `ids[prefix_offset:read_offset]` (text already
produced). The window starts at the tokens of the previous emission, so decoders that treat a sequence's first
token specially (SentencePiece/Metaspace strip its leading space) see the same first token in both decodes, and
it starts where the previous text was complete, so byte-level decoding restarts on a character boundary.
Text is held back while it may still change:
- it ends with U+FFFD: a character split across tokens is incomplete;
- the last token is a byte-fallback token: even complete characters in the run are not final until it ends;
- with cleanup, a trailing space (and " n", " '" ...) waits for the next characters; the window decodes raw text
  and the cleanup runs on pieces cut where no pattern can span the cut.
`final` flushes everything, reconciled against one full decode of the stream (O(n) once, not per token).
"""
from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

log = logging.getLogger("splitserve.detokenizer")

REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# transformers' clean_up_tokenization: spaces removed before these endings (in this order).
_CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# A cut is safe once the text before it cannot end a proper prefix of one of the patterns (" ", " '", " n", " n'",
# " 'v", " 'r").
_CLEANUP_PATTERN_LAST_CHARS = frozenset(" 'nvr")


@dataclass(frozen=True)
class DecodeTraits:
    """What the detokenizer needs to know about a tokenizer's decode; computed once per tokenizer."""

    vocab_size: int
    special_ids: frozenset[int]  # dropped by decode(skip_special_tokens=True): added tokens flagged special
    byte_ids: frozenset[int]  # <0xNN> tokens that the decoder merges into bytes (SentencePiece byte fallback)
    cleanup: bool  # decode applies clean_up_tokenization

    @property
    def streamable(self) -> bool:
        """DecodeStream yields exactly decode's text: no byte-fallback runs, no cleanup."""
        return not self.byte_ids and not self.cleanup

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def of(backend: Tokenizer, cleanup: bool) -> DecodeTraits:
        return DecodeTraits(
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            special_ids=frozenset(
                token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special),
            byte_ids=_byte_fallback_ids(backend),
            cleanup=cleanup,
        )


class IncrementalDetokenizer:
    """One generation stream: feed ids with `add`, get the text they complete."""

    def __init__(self, backend: Tokenizer, cleanup: bool = False) -> None:
        self.backend = backend
        self.ids: list[int] = []
        self.finished = False
        self._traits = DecodeTraits.of(backend, cleanup)
        self._stream = DecodeStream(skip_special_tokens=True) if self._traits.streamable else None
        self._emitted: list[str] = []
        # Our window (when DecodeStream cannot serve this tokenizer):
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # text of ids[:read_offset] has been produced (maybe not yet emitted: _pending)
        self._prefix_text: str | None = ""  # decode(ids[prefix_offset:read_offset]), None when stale
        self._pending = ""  # produced text held back for clean_up_tokenization_spaces
        self._committed_tail = ""  # the last raw (uncleaned) characters before _pending

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Returns the new text completed by token_ids (possibly empty); `final` flushes everything held back."""
        if self.finished:
            raise ValueError("detokenize stream already finished: no ids may follow a final message")
        for token_id in token_ids:
            if not 0 <= token_id < self._traits.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self._traits.vocab_size})")
        self.ids.extend(token_ids)
        if final:
            self.finished = True
            return self._flush()
        if not token_ids:
            return ""
        if self._stream is not None:
            text = self._stream.step(self.backend, list(token_ids)) or ""
            self._emitted.append(text)
            return text
        return self._window_step()

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def _window_step(self) -> str:
        if self._ends_in_byte_run():
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        # Emit only what extends the text already sent and is complete; else wait for more ids.
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        if not text.startswith(self._prefix_text):
            return ""  # a decoder that rewrote earlier text: wait, `final` reconciles
        produced = text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = None
        return self._emit(produced)

    def _decode(self, ids: list[int]) -> str:
        """The backend's decode, before cleanup."""
        return self.backend.decode(ids, skip_special_tokens=True)

    def _ends_in_byte_run(self) -> bool:
        # Skipped special tokens do not end a run: the decoder never sees them. Before read_offset no run is open.
        for token_id in reversed(self.ids[self.read_offset:]):
            if token_id not in self._traits.special_ids:
                return token_id in self._traits.byte_ids
        return False

    def _emit(self, produced: str) -> str:
        if self._traits.cleanup:
            text = self._pending + produced
            cut = _last_safe_cut(self._committed_tail, text)
            self._committed_tail = (self._committed_tail + text[:cut])[-3:]
            self._pending = text[cut:]
            produced = clean_up_tokenization(text[:cut])
        self._emitted.append(produced)
        return produced

    def _flush(self) -> str:
        # One full decode per stream (not per token) turns the incremental arithmetic into a guarantee.
        full = self._decode(self.ids)
        if self._traits.cleanup:
            full = clean_up_tokenization(full)
        sent = self.text
        if full.startswith(sent):
            rest = full[len(sent):]
        elif self._stream is not None:  # never seen: DecodeStream checks that its text only grows
            log.error("detokenized stream diverged from the full decode; sending nothing more")
            rest = ""
        else:  # never seen; would mean a decoder whose output is not prefix-stable
            log.error("detokenized stream diverged from the full decode; sending the window tail")
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            tail = self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            text = self._pending + tail
            rest = clean_up_tokenization(text) if self._traits.cleanup else text
        self._pending = ""
        self._emitted.append(rest)
        return rest


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: the spaces that word-piece tokenizers put before punctuation go."""
    for pattern, replacement in _CLEANUP_REPLACEMENTS:
        text = text.replace(pattern, replacement)
    return text


def _last_safe_cut(before: str, text: str) -> int:
    """The largest i such that cleanup(raw + text[:i]) + cleanup(text[i:] + anything) == cleanup(all of it).

    `before` ends the raw text already cleaned (cut there safely). Cleanup only deletes spaces and every pattern
    starts with one, so no match can span a cut whose text before it ends in a character that ends no proper
    prefix of a pattern, or in three non-spaces (the patterns' prefixes are at most three long); deleting spaces
    keeps both properties through the chain of replaces.
    """
    context = before + text
    for i in range(len(context), len(before), -1):
        if context[i - 1] not in _CLEANUP_PATTERN_LAST_CHARS or " " not in context[max(0, i - 3):i]:
            return i - len(before)
    return 0


def _byte_fallback_ids(backend: Tokenizer) -> frozenset[int]:
    """Ids of `<0xNN>` tokens when the decoder merges them into bytes (SentencePiece byte fallback)."""
    if '"ByteFallback"' not in json.dumps(json.loads(backend.to_str()).get("decoder")):
        return frozenset()
    return frozenset(token_id for token, token_id in backend.get_vocab(with_added_tokens=True).items()
                     if _BYTE_TOKEN.fullmatch(token))
