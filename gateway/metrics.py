"""The gateway's Prometheus metrics: the user's view of a request."""
from prometheus_client import Counter, Gauge, Histogram

from common.metrics import latency_buckets

PHASES = ("tokenize", "queue", "prefill", "decode", "detokenize")   # every request's
KV_TRANSFER = "kv_transfer"   # a phase of disaggregated requests only: prefill engine -> decode engine

PHASE_SECONDS = Histogram("splitserve_request_phase_seconds", "Time a request spent in each phase", ["phase"],
                          buckets=latency_buckets())
TIME_TO_FIRST_TOKEN = Histogram("splitserve_time_to_first_token_seconds",
                                "Request received by the gateway -> first text chunk sent", buckets=latency_buckets())
INTER_TOKEN_LATENCY = Histogram("splitserve_inter_token_latency_seconds", "Time between successive streamed tokens",
                                buckets=latency_buckets())
E2E_LATENCY = Histogram("splitserve_e2e_request_latency_seconds", "Request received -> last chunk sent",
                        buckets=latency_buckets())
REQUESTS = Counter("splitserve_requests", "Finished requests", ["finish_reason", "code"])
PROMPT_TOKENS = Counter("splitserve_prompt_tokens", "Prompt tokens of finished requests")
GENERATION_TOKENS = Counter("splitserve_generation_tokens", "Generated tokens streamed to clients")
REQUESTS_IN_FLIGHT = Gauge("splitserve_requests_in_flight", "Requests being served by the gateway")
REQUESTS_WAITING = Gauge("splitserve_requests_waiting",
                         "Requests the gateway holds back because --max-concurrent-requests are running")
STALLED_CLIENTS = Counter("splitserve_stalled_clients", "Streams ended because the client stopped reading "
                          "(a write waited longer than --stream-write-timeout-seconds)")
FAILOVERS = Counter("splitserve_failovers", "Streams moved to another engine after theirs was lost mid-stream",
                    ["reason"])
TOOL_CALL_REQUESTS = Counter("splitserve_tool_call_requests", "Chat requests with tools, by tool_choice (auto, "
                             "required, named)", ["tool_choice"])
