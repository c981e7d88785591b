"""Prometheus metrics of the tokenizer service."""
from __future__ import annotations

from prometheus_client import Histogram

from common.metrics import latency_buckets

TOKENIZER_SECONDS = Histogram(
    "splitserve_tokenizer_seconds", "Time spent per tokenizer operation (one Detokenize message each).",
    ["op"], buckets=latency_buckets())
