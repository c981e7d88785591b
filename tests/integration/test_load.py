"""Load from an independent client: locust (headless) sends 200 requests, 16 at a time, to the OpenAI-compatible
API (streamed chat completions and whole completions, alternating); every one succeeds with the full usage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[1] / "load" / "locustfile.py"
REQUESTS, USERS = 200, 16


def test_locust_200_requests_at_16_concurrent_without_errors(tiny_stack, tmp_path):
    report = tmp_path / "locust.json"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(USERS),
               "--spawn-rate", str(USERS), "--host", f"http://127.0.0.1:{tiny_stack.ports.gateway_http}",
               "--run-time", "600", "--stop-timeout", "60", "--only-summary",
               "--json-file", str(report.with_suffix(""))]   # locust adds .json
    done = subprocess.run(command, env={**os.environ, "LOAD_REQUESTS": str(REQUESTS), "LOAD_MAX_TOKENS": "32"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stats = {entry["name"]: entry for entry in json.loads(report.read_text())}
    served = [stats["/v1/completions"], stats["/v1/chat/completions (stream)"]]
    assert sum(entry["num_requests"] for entry in served) == REQUESTS
    assert all(entry["num_failures"] == 0 for entry in stats.values()), stats
    assert stats["TTFT"]["num_requests"] == REQUESTS // 2
    seconds = max(e["last_request_timestamp"] for e in served) - min(e["start_time"] for e in served)
    print(f"locust: {REQUESTS} requests, {USERS} users, {REQUESTS / seconds:.1f} req/s, "
          f"{REQUESTS * 32 / seconds:.0f} output tok/s, "
          + ", ".join(f"{name} mean {e['total_response_time'] / e['num_requests']:.0f} ms"
                      for name, e in stats.items()))
