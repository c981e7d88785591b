"""The engine's Prometheus metrics: the batch's view."""
from prometheus_client import Counter, Gauge, Histogram

from common.metrics import latency_buckets

STEP_SECONDS = Histogram("splitserve_engine_step_seconds", "Duration of one engine step", ["kind"],
                         buckets=latency_buckets())
BATCH_SIZE = Histogram("splitserve_engine_batch_size", "Sequences per engine step",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
REQUESTS_RUNNING = Gauge("splitserve_engine_requests_running", "Sequences holding KV cache and being computed")
REQUESTS_WAITING = Gauge("splitserve_engine_requests_waiting", "Sequences waiting to be scheduled")
KV_CACHE_USAGE = Gauge("splitserve_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
PREFIX_CACHE_QUERIES = Counter("splitserve_engine_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
PREFIX_CACHE_HITS = Counter("splitserve_engine_prefix_cache_hits", "Prompt tokens found in the prefix cache")
REQUESTS_FINISHED = Counter("splitserve_engine_requests_finished", "Sequences that left the engine", ["finish_reason"])
PREEMPTIONS = Counter("splitserve_engine_preemptions", "Sequences preempted because the KV cache was full")
SPEC_DRAFT_TOKENS = Counter("splitserve_engine_spec_draft_tokens",
                            "Guessed tokens verified by speculative and lookahead steps")
SPEC_ACCEPTED_TOKENS = Counter("splitserve_engine_spec_accepted_tokens",
                               "Tokens beyond the first that speculative and lookahead steps produced")
# Masks cost tens of microseconds to milliseconds per step: finer than the latency buckets.
MASK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
STRUCTURED_REQUESTS = Counter("splitserve_engine_structured_requests", "Requests with a structured-output constraint",
                              ["kind"])
STRUCTURED_COMPILE_SECONDS = Histogram("splitserve_engine_structured_compile_seconds",
                                       "Compiling a constraint that was not in the cache (off the step loop)",
                                       buckets=latency_buckets())
STRUCTURED_COMPILE_CACHE_HITS = Counter("splitserve_engine_structured_compile_cache_hits",
                                        "Constraints found already compiled")
STRUCTURED_MASK_SECONDS = Histogram("splitserve_engine_structured_mask_seconds",
                                    "Computing and applying the token masks of a step's constrained rows",
                                    buckets=MASK_BUCKETS)
STRUCTURED_MATCHERS = Gauge("splitserve_engine_structured_matchers",
                            "Grammar matchers held by live sequences (one per constrained sequence or beam)")


KV_TRANSFER_BYTES = Counter("splitserve_engine_kv_transfer_bytes", "KV-cache bytes sent to or received from other "
                            "engines (disaggregated serving)", ["direction"])
KV_TRANSFER_BLOCKS = Counter("splitserve_engine_kv_transfer_blocks", "KV-cache blocks sent or received",
                             ["direction"])
KV_TRANSFER_SKIPPED_BLOCKS = Counter("splitserve_engine_kv_transfer_skipped_blocks",
                                     "Leading prompt blocks a decode engine held already, so not transferred")
KV_TRANSFER_SECONDS = Histogram("splitserve_engine_kv_transfer_seconds", "Duration of one prompt's KV transfer, "
                                "first request to last block", ["direction"], buckets=latency_buckets())


_STEP_KINDS = {kind: STEP_SECONDS.labels(kind=kind) for kind in ("decode", "prefill", "mixed")}


def observe_step(num_decodes: int, num_chunks: int, seconds: float) -> None:
    kind = "decode" if num_decodes == num_chunks else "prefill" if num_decodes == 0 else "mixed"
    _STEP_KINDS[kind].observe(seconds)   # the labelled children looked up once: this runs every step
    BATCH_SIZE.observe(num_chunks)


_COUNTERS = (PREEMPTIONS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, SPEC_DRAFT_TOKENS, SPEC_ACCEPTED_TOKENS)


class Exporter:
    """Exports an engine's gauges (from its stats) and its counters (plain integers the step loop keeps, in
    _COUNTERS' order) by what they grew since the last export: called between steps."""

    def __init__(self) -> None:
        self.reported = (0,) * len(_COUNTERS)

    def publish(self, stats, counts: tuple[int, ...]) -> None:
        REQUESTS_RUNNING.set(stats.running)
        REQUESTS_WAITING.set(stats.waiting)
        KV_CACHE_USAGE.set(stats.kv_blocks_used / max(1, stats.kv_blocks_total))
        STRUCTURED_MATCHERS.set(stats.matchers)
        for counter, now, before in zip(_COUNTERS, counts, self.reported):
            if now > before:
                counter.inc(now - before)
        self.reported = counts
