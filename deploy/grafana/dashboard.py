"""Generates the splitserve Grafana dashboard: `python deploy/grafana/dashboard.py` writes dashboards/splitserve.json.

`--check` exits 1 when the committed JSON differs from what this file generates (a test runs it); `--markdown`
prints the panel list that the README's "Dashboard panels" holds (a test checks every panel is there). Every query
here is also run against a real Prometheus scraping the real services (tests/deploy/test_observability.py), so a
panel that names a metric that does not exist fails the tests. The README's "Dashboard panels" lists each panel.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "splitserve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}   # provisioned with this uid (provisioning/datasources)
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)
REPLICA = 'instance=~"$instance"'


@dataclass
class Query:
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    description: str
    queries: list[Query]
    unit: str = "short"
    width: int = 8
    max: float | None = None
    kind: str = "timeseries"


@dataclass
class Row:
    title: str
    panels: list[Panel]
    repeat: str = ""        # a template variable: one copy of the row per value
    collapsed: bool = False
    extra: dict = field(default_factory=dict)


def rate(metric: str, selector: str = "") -> str:
    return f"rate({metric}{{{selector}}}[{RATE}])" if selector else f"rate({metric}[{RATE}])"


def quantiles(histogram: str, selector: str = "", by: str = "", legend: str = "") -> list[Query]:
    """p50/p95/p99 of a histogram, summed over instances (and split by `by`)."""
    group = f"le, {by}" if by else "le"
    return [Query(f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', selector)}))",
                  f"p{round(q * 100)}{' ' + legend if legend else ''}") for q in QUANTILES]


def phase_panel(phase: str, meaning: str) -> Panel:
    return Panel(f"Phase: {phase}", f"p50/p95/p99 of the time requests spent in the {phase} phase: {meaning} "
                 f"(splitserve_request_phase_seconds{{phase=\"{phase}\"}}).",
                 quantiles("splitserve_request_phase_seconds", f'phase="{phase}"'), unit="s")


ERRORS = 'code!~"OK|CANCELLED"'

ROWS = [
    Row("Traffic", [
        Panel("Requests by status code",
              "Finished requests per second at the gateway, by gRPC status code (OK, INVALID_ARGUMENT, "
              "UNAVAILABLE, ...): splitserve_requests_total.",
              [Query(f"sum by (code) ({rate('splitserve_requests_total')})", "{{code}}")], unit="reqps"),
        Panel("Error ratio",
              "Share of finished requests that ended with an error status (every code but OK and CANCELLED); "
              "0 while there is no error. The SplitserveErrorRateHigh alert fires above 5%.",
              [Query(f"(sum({rate('splitserve_requests_total', ERRORS)}) or vector(0)) / "
                     f"clamp_min(sum({rate('splitserve_requests_total')}), 1e-9)", "error ratio")],
              unit="percentunit", max=1),
        Panel("Tokens per second",
              "Prompt tokens taken in and generated tokens streamed out per second, over all engines "
              "(splitserve_prompt_tokens_total, splitserve_generation_tokens_total).",
              [Query(f"sum({rate('splitserve_prompt_tokens_total')})", "prompt tokens/s"),
               Query(f"sum({rate('splitserve_generation_tokens_total')})", "generated tokens/s")]),
        Panel("Requests in flight, running, waiting",
              "In flight: requests the gateways are serving (splitserve_requests_in_flight). Running: sequences "
              "holding KV cache in the engines. Waiting: sequences queued in the engines for their prefill.",
              [Query("sum(splitserve_requests_in_flight)", "in flight (gateway)"),
               Query("sum(splitserve_engine_requests_running)", "running (engines)"),
               Query("sum(splitserve_engine_requests_waiting)", "waiting (engines)")]),
        Panel("Services up",
              "1 when Prometheus scraped the service's /metrics at its last try, per job and instance (up). "
              "The SplitserveTargetDown alert fires after a minute at 0.",
              [Query('up{job=~"splitserve-.*"}', "{{job}} {{instance}}")], max=1),
    ]),
    Row("Latency (the user's view, at the gateway)", [
        Panel("Time to first token",
              "p50/p95/p99 from the gateway receiving a request to its first text chunk being sent "
              "(splitserve_time_to_first_token_seconds). The SplitserveTimeToFirstTokenHigh alert watches p95.",
              quantiles("splitserve_time_to_first_token_seconds"), unit="s"),
        Panel("Inter-token latency",
              "p50/p95/p99 of the time between successive streamed tokens (splitserve_inter_token_latency_seconds).",
              quantiles("splitserve_inter_token_latency_seconds"), unit="s"),
        Panel("End-to-end latency",
              "p50/p95/p99 from request received to last chunk sent (splitserve_e2e_request_latency_seconds).",
              quantiles("splitserve_e2e_request_latency_seconds"), unit="s"),
    ]),
    Row("Phases (tokenize, queue, prefill, decode, detokenize)", [
        phase_panel("tokenize", "the tokenizer service turning the prompt or chat into token ids"),
        phase_panel("queue", "waiting in the engine before its first scheduled step"),
        phase_panel("prefill", "the engine computing the prompt's KV cache and first token"),
        phase_panel("decode", "from the first to the last generated token"),
        phase_panel("detokenize", "the sum of the detokenizer round trips that turned tokens into text"),
        Panel("Tokenizer service time",
              "p50/p95/p99 of the tokenizer service's own work per call, by operation (splitserve_tokenizer_seconds).",
              quantiles("splitserve_tokenizer_seconds", by="op", legend="{{op}}"), unit="s"),
    ]),
    Row("Engines (all replicas)", [
        Panel("Batch size",
              "Sequences per engine step: the mean and p95 over all engines (splitserve_engine_batch_size). "
              "Continuous batching at work: it grows with concurrent requests.",
              [Query(f"sum({rate('splitserve_engine_batch_size_sum')}) / "
                     f"clamp_min(sum({rate('splitserve_engine_batch_size_count')}), 1e-9)", "mean"),
               Query(f"histogram_quantile(0.95, sum by (le) ({rate('splitserve_engine_batch_size_bucket')}))",
                     "p95")]),
        Panel("Step time by kind",
              "p50/p95 duration of one engine step by kind: prefill, decode or mixed (splitserve_engine_step_seconds).",
              [q for q in quantiles("splitserve_engine_step_seconds", by="kind", legend="{{kind}}")
               if not q.legend.startswith("p99")], unit="s"),
        Panel("KV cache use",
              "Fraction of KV-cache blocks in use, highest and mean over engines "
              "(splitserve_engine_kv_cache_usage_ratio). The SplitserveKVCacheNearFull alert fires above 90%.",
              [Query("max(splitserve_engine_kv_cache_usage_ratio)", "max"),
               Query("avg(splitserve_engine_kv_cache_usage_ratio)", "mean")], unit="percentunit", max=1),
        Panel("Prefix cache hit rate",
              "Share of prompt tokens found in the engines' prefix cache (splitserve_engine_prefix_cache_hits_total "
              "/ _queries_total); 0 while no prompt was looked up.",
              [Query(f"sum({rate('splitserve_engine_prefix_cache_hits_total')}) / "
                     f"clamp_min(sum({rate('splitserve_engine_prefix_cache_queries_total')}), 1e-9)", "hit rate")],
              unit="percentunit", max=1),
        Panel("Preemptions",
              "Sequences preempted per second because the KV cache ran out (splitserve_engine_preemptions_total); "
              "they are recomputed later.",
              [Query(f"sum({rate('splitserve_engine_preemptions_total')})", "preemptions/s")]),
        Panel("Finished sequences by reason",
              "Sequences leaving the engines per second by finish reason: stop, length or abort "
              "(splitserve_engine_requests_finished_total).",
              [Query(f"sum by (finish_reason) ({rate('splitserve_engine_requests_finished_total')})",
                     "{{finish_reason}}")]),
    ]),
    Row("Structured output (constraints)", [
        Panel("Constrained requests by kind",
              "Requests per second that carry a structured-output constraint, by kind: json_schema, json_object, "
              "regex, choice, grammar (splitserve_engine_structured_requests_total).",
              [Query(f"sum by (kind) ({rate('splitserve_engine_structured_requests_total')})", "{{kind}}")],
              unit="reqps"),
        Panel("Constraint compile time and cache hits",
              "p50/p95/p99 of compiling a constraint not in the cache, off the step loop: it adds to that "
              "request's time to first token only (splitserve_engine_structured_compile_seconds); and the share "
              "of constraints found compiled (splitserve_engine_structured_compile_cache_hits_total).",
              quantiles("splitserve_engine_structured_compile_seconds") +
              [Query(f"sum({rate('splitserve_engine_structured_compile_cache_hits_total')}) / clamp_min("
                     f"sum({rate('splitserve_engine_structured_compile_cache_hits_total')}) + "
                     f"sum({rate('splitserve_engine_structured_compile_seconds_count')}), 1e-9)",
                     "cache hit rate (0-1)")], unit="s"),
        Panel("Mask cost per step",
              "p50/p95 of computing and applying a step's token masks for its constrained rows "
              "(splitserve_engine_structured_mask_seconds), and their share of all step time: what constraints "
              "cost the batch.",
              [q for q in quantiles("splitserve_engine_structured_mask_seconds") if not q.legend.startswith("p99")] +
              [Query(f"sum({rate('splitserve_engine_structured_mask_seconds_sum')}) / "
                     f"clamp_min(sum({rate('splitserve_engine_step_seconds_sum')}), 1e-9)",
                     "share of step time (0-1)")], unit="s"),
    ]),
    Row("Engine $instance", repeat="instance", panels=[
        Panel("Running and waiting",
              "This engine's sequences holding KV cache and waiting for prefill: how the gateway spreads the load.",
              [Query(f"sum(splitserve_engine_requests_running{{{REPLICA}}})", "running"),
               Query(f"sum(splitserve_engine_requests_waiting{{{REPLICA}}})", "waiting")], width=6),
        Panel("Finished sequences",
              "This engine's finished sequences per second by finish reason: the share of traffic it serves.",
              [Query(f"sum by (finish_reason) ({rate('splitserve_engine_requests_finished_total', REPLICA)})",
                     "{{finish_reason}}")], width=6),
        Panel("KV cache and prefix hits",
              "This engine's KV-cache use and the share of prompt tokens its prefix cache served.",
              [Query(f"max(splitserve_engine_kv_cache_usage_ratio{{{REPLICA}}})", "KV cache use"),
               Query(f"sum({rate('splitserve_engine_prefix_cache_hits_total', REPLICA)}) / "
                     f"clamp_min(sum({rate('splitserve_engine_prefix_cache_queries_total', REPLICA)}), 1e-9)",
                     "prefix hit rate")], unit="percentunit", max=1, width=6),
        Panel("Step time p95 and batch size",
              "This engine's p95 step time by kind and its mean batch size.",
              [Query(f"histogram_quantile(0.95, sum by (le, kind) "
                     f"({rate('splitserve_engine_step_seconds_bucket', REPLICA)}))", "p95 step {{kind}} (s)"),
               Query(f"sum({rate('splitserve_engine_batch_size_sum', REPLICA)}) / "
                     f"clamp_min(sum({rate('splitserve_engine_batch_size_count', REPLICA)}), 1e-9)",
                     "mean batch size")], width=6),
    ]),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int, repeat: str) -> dict:
    defaults: dict = {"unit": panel.unit, "min": 0}
    if panel.max is not None:
        defaults["max"] = panel.max
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title + (f" ({'$' + repeat})" if repeat else ""),
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr,
                     "legendFormat": q.legend, "range": True} for i, q in enumerate(panel.queries)],
    }


def build() -> dict:
    panels: list[dict] = []
    panel_id, y = 1, 0
    for row in ROWS:
        row_json: dict = {"id": panel_id, "type": "row", "title": row.title, "collapsed": row.collapsed,
                          "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}
        if row.repeat:
            row_json["repeat"] = row.repeat
        panels.append(row_json)
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, panel_id, x, y, row.repeat))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    return {
        "uid": "splitserve",
        "title": "splitserve",
        "description": "LLM serving: traffic, per-phase latency, engines and each engine replica.",
        "tags": ["splitserve", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "instance",
            "label": "engine",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": "label_values(splitserve_engine_requests_running, instance)", "refId": "instance"},
            "definition": "label_values(splitserve_engine_requests_running, instance)",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def markdown() -> str:
    """The panel list for the README's "Dashboard panels"."""
    lines = []
    for row in ROWS:
        each = " (one row per engine replica: the `engine` variable, Prometheus' `instance` label)" if row.repeat else ""
        lines += ["", f"*{row.title.replace('$instance', '<replica>')}*{each}:", ""]
        lines += [f"- **{panel.title}**: {panel.description}" for panel in row.panels]
    return "\n".join(lines[1:]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    parser.add_argument("--markdown", action="store_true", help="print the panel list for the README")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(), end="")
        return 0
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
