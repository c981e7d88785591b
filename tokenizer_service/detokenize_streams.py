"""The sequences of one multiplexed Detokenize stream: an IncrementalDetokenizer per caller-chosen number."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizer_service.detokenizer import IncrementalDetokenizer

MAX_LIVE_SEQUENCES = 1 << 16   # per stream: far above any batch, low enough that a caller's leak shows


class DetokenizeStream:
    """Maps sequence numbers to detokenizers. A number above every earlier one starts a sequence; its final piece
    (or any refused piece) forgets it, so a well-behaved caller leaves nothing behind. `live` counts what is held."""

    def __init__(self, new_detokenizer: Callable[[], IncrementalDetokenizer],
                 on_live_change: Callable[[int], None] = lambda delta: None) -> None:
        self._new = new_detokenizer
        self._on_live_change = on_live_change
        self._sequences: dict[int, IncrementalDetokenizer] = {}
        self._highest = 0   # numbers start at 1

    @property
    def live(self) -> int:
        return len(self._sequences)

    def add(self, sequence: int, token_ids: Sequence[int], final: bool) -> str:
        """The text these ids complete; raises ValueError for a piece that cannot be taken. A sequence whose
        piece raised is forgotten."""
        detokenizer = self._sequences.get(sequence)
        if detokenizer is None:
            if sequence <= self._highest:
                raise ValueError(f"sequence {sequence} already finished (or was never started): a new sequence "
                                 f"needs a number above {self._highest}")
            if len(self._sequences) >= MAX_LIVE_SEQUENCES:
                raise ValueError(f"{MAX_LIVE_SEQUENCES} sequences are open on this stream: finish some first")
            self._highest = sequence
            detokenizer = self._sequences[sequence] = self._new()
            self._on_live_change(1)
        try:
            text = detokenizer.add(token_ids, final=final)
        except Exception:
            self._forget(sequence)
            raise
        if final:
            self._forget(sequence)
        return text

    def close(self) -> None:
        """The stream ended: forget every sequence still open."""
        for sequence in list(self._sequences):
            self._forget(sequence)

    def _forget(self, sequence: int) -> None:
        if self._sequences.pop(sequence, None) is not None:
            self._on_live_change(-1)
