"""Structured, quiet-by-default logging: `time level logger message key=value ...` on stderr."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def clip(text: str, chars: int = 40) -> str:
    """A user's string as it may be echoed in an error message or a log line: short."""
    return text if len(text) <= chars else text[:chars] + "..."


def kv(**fields: object) -> str:
    """Formats fields as `key=value` pairs for a log line."""
    return " ".join(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in fields.items())
