"""Prometheus metrics of the tokenizer service."""
from __future__ import annotations

from prometheus_client import Gauge, Histogram

from common.metrics import latency_buckets

TOKENIZER_SECONDS = Histogram(
    "splitserve_tokenizer_seconds", "Time spent per tokenizer operation (one Detokenize piece each).",
    ["op"], buckets=latency_buckets())
DETOKENIZE_SEQUENCES = Gauge(
    "splitserve_tokenizer_detokenize_sequences", "Generated sequences with an open detokenizer (all streams).")
