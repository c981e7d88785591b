"""Shared Prometheus settings: latency histogram buckets from 0.5 ms to 120 s.

Override with SPLITSERVE_LATENCY_BUCKETS="0.001,0.01,0.1,1,10" (seconds, ascending).
"""
from __future__ import annotations

import os

_DEFAULT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
)


def latency_buckets() -> tuple[float, ...]:
    raw = os.environ.get("SPLITSERVE_LATENCY_BUCKETS", "").strip()
    if not raw:
        return _DEFAULT_BUCKETS
    buckets = tuple(float(part) for part in raw.split(","))
    if list(buckets) != sorted(buckets) or buckets[0] <= 0:
        raise ValueError("SPLITSERVE_LATENCY_BUCKETS must be positive and ascending")
    return buckets
