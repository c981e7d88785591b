"""The structured scenario: 16 concurrent requests, half of them constrained by a JSON schema, against the same 16
unconstrained, through the public gRPC API. The schema (an array of at least 20 people) does not end within
max_tokens, so both runs produce the same number of tokens and the difference is what the masks cost the batch.
The engine's own histogram gives the mask cost per step."""
from __future__ import annotations

import json
import statistics
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.splitserve_client import run_concurrent
from splitserve.v1 import common_pb2

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string"}}, "required": ["name", "age", "city"]}
SCHEMA = {"type": "array", "items": PERSON, "minItems": 20}
MASK = "splitserve_engine_structured_mask_seconds"


def _mask_totals(metrics_port: int) -> tuple[float, float]:
    """(seconds, passes) of the engine's mask histogram so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name in (f"{MASK}_sum", f"{MASK}_count")}
    return values.get(f"{MASK}_sum", 0.0), values.get(f"{MASK}_count", 0.0)


def structured_scenario(address: str, metrics_port: int, prompts: list[str], max_tokens: int,
                        repeats: int = 3) -> dict:
    prompts = [f"{p} Answer as JSON: a list of 20 people." for p in prompts[:16]]
    schema = common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))
    constraints = [schema if i % 2 else None for i in range(len(prompts))]
    run_concurrent(address, prompts[:2], 4, constraints[:2])    # warm-up: the schema's compile is not timed
    runs: dict[str, list[tuple[float, float]]] = {"unconstrained": [], "half_json_schema": []}
    mask_seconds = mask_passes = 0.0
    for _ in range(repeats):   # alternated, so that a noisy minute of the machine falls on both
        for name, per_request in (("unconstrained", None), ("half_json_schema", constraints)):
            before = _mask_totals(metrics_port)
            timings, wall = run_concurrent(address, prompts, max_tokens, per_request)
            after = _mask_totals(metrics_port)
            runs[name].append((sum(t.tokens for t in timings) / wall, statistics.median(t.tpot for t in timings)))
            if per_request is not None:
                mask_seconds += after[0] - before[0]
                mask_passes += after[1] - before[1]
    systems = {name: {"tokens_per_s": statistics.median(r[0] for r in values),
                      "tpot_s": statistics.median(r[1] for r in values),
                      "runs_tokens_per_s": [round(r[0], 1) for r in values]} for name, values in runs.items()}
    systems["half_json_schema"]["mask_ms_per_step"] = 1000 * mask_seconds / max(1.0, mask_passes)
    return {"systems": systems, "ratios": {"constrained_throughput_over_unconstrained": report.ratio(
        systems["half_json_schema"]["tokens_per_s"], systems["unconstrained"]["tokens_per_s"])}}
