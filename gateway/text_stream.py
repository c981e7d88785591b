"""One completion's tokens turned into the text the client gets: detokenized (through the shared Detokenize
stream), cut at the first stop string, with the token ids and logprobs behind each piece of text.

Tokens whose text is held back (an incomplete character, the possible start of a stop string) wait with their
logprobs and go out with the next text. Tokens after the one that completes a stop string are dropped, so several
tokens that arrive together are detokenized one at a time when there are stop strings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.detokenize import DetokenizeSequence
from gateway.stops import StopMatcher
from splitserve.v1 import common_pb2


@dataclass
class TextPiece:
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs]
    finish_reason: str = ""          # set on the last piece: the engine's, or "stop" for a stop string


@dataclass
class TextStream:
    detokenize: DetokenizeSequence
    stops: StopMatcher
    kept: int = 0                    # tokens returned so far (none past a stop string)
    _ids: list[int] = field(default_factory=list)                          # behind text not yet returned
    _logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)

    async def add(self, token_ids: Sequence[int], logprobs: Sequence[common_pb2.TokenLogprobs],
                  finish_reason: str) -> TextPiece | None:
        """The piece to send for these tokens (the engine's finish_reason, if any, ends the stream), or None while
        their text is held back."""
        pieces = [[t] for t in token_ids] if self.stops.stops and len(token_ids) > 1 else [list(token_ids)]
        text, used = "", 0
        for i, piece in enumerate(pieces):
            final = bool(finish_reason) and i == len(pieces) - 1
            text += self.stops.feed(await self.detokenize.add(piece, final), final=final)
            used += len(piece)
            if self.stops.stopped:
                finish_reason = "stop"
                break
        self._ids.extend(token_ids[:used])
        self._logprobs.extend(logprobs[:used])
        self.kept += used
        if not text and not finish_reason:
            return None
        piece = TextPiece(text, self._ids, self._logprobs, finish_reason)
        self._ids, self._logprobs = [], []
        return piece
