"""Stop strings, applied on the text stream: text that could be the start of a stop string is held back until
it is known not to be, and the stop string itself is never returned, even when it spans chunks."""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """Returns the text safe to emit now; sets `stopped` once a stop string is seen (nothing after it)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return buffer[:cut]
        if final:
            self.held = ""
            return buffer
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        for length in range(min(self.longest - 1, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0
