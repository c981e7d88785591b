"""A real Prometheus, with the deploy scrape config and rules, scrapes the real services; every dashboard panel has data.

The config is deploy/prometheus/prometheus.yml with each job's DNS discovery swapped for the test's loopback ports
and a 1 s scrape interval; the rules are deploy/prometheus/rules as they are. Traffic goes through the gateway in
two waves, so every counter and histogram rises between scrapes; then every query of every panel of the committed
dashboard (Grafana's variables filled in) must return at least one series with a real number from Prometheus.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from common.stack import free_port
from splitserve.v1 import common_pb2, gateway_pb2_grpc
from tests.deploy.conftest import DEPLOY, REPO, ComposeStack, tool
from tests.helpers import make_request, rpc_error, stream

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "splitserve.json"
RATE_INTERVAL = "5s"   # Grafana's $__rate_interval for a 1 s scrape interval is 4 scrapes; one more for safety


def prometheus_config(stack: ComposeStack) -> dict:
    """The deploy config, pointed at this stack."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        "splitserve-gateway": [stack.processes["gateway"]],
        "splitserve-tokenizer": [stack.processes["tokenizer"]],
        "splitserve-engine": stack.engines,
    }
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / rule) for rule in config["rule_files"]]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p.metrics_port}" for p in targets[job["job_name"]]]}]
    return config


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: object) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> list[dict]:
        return self.get("/api/v1/targets", state="active")["activeTargets"]


@pytest.fixture(scope="module")
def prometheus(compose_stack: ComposeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(compose_stack)))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")
    process = subprocess.Popen([tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None, (folder / "prometheus.log").read_text()
        assert time.monotonic() < deadline, "Prometheus did not get ready"
        time.sleep(0.2)
    yield Prometheus(url)
    process.terminate()
    process.wait(30)
    log.close()
    shutil.rmtree(folder / "data", ignore_errors=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def send_traffic(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    """Two waves of plain and chat requests, and one bad request, with scrapes in between."""
    def wave(count: int, offset: int) -> None:
        requests = [make_request(f"observe {i + offset}: the weather today is" if i % 2 else
                                 [("user", f"Tell me a story about {i + offset} cats.")],
                                 max_tokens=24, ignore_eos=True) for i in range(count)]
        # Constrained ones too: a new constraint each wave (a compile) and one seen before from the second on.
        constrained = [make_request(f"observe {offset}: pick one", max_tokens=24, structured_output=
                                    common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=choices)))
                       for choices in (["yes", "no"], [f"wave {offset}", "none"])]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: stream(gateway, r, timeout=60), requests + constrained))
        assert all(r.last.finish_reason == "length" for r in results[:count])
        assert all(r.last.finish_reason == "stop" for r in results[count:])

    wave(4, 0)
    error = rpc_error(lambda: gateway.Generate(make_request("bad", temperature=-1.0), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(2.5)   # a couple of scrapes: the second wave's increases land inside every rate window
    wave(8, 100)
    time.sleep(2.5)


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) for every target of every panel of the committed dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    repeated = {p["id"] for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat")}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["legendFormat"], target["expr"]))
    assert len(queries) >= 40 and repeated
    return queries


def test_every_target_is_up_and_every_panel_query_returns_data(compose_stack: ComposeStack, prometheus: Prometheus):
    # Every target of every job is scraped and up (before the traffic, so Prometheus sees it all).
    def all_up() -> list[dict] | None:
        targets = prometheus.targets()
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = wait_for(all_up, 60, "every target up")
    assert sorted(t["labels"]["job"] for t in targets) == [
        "splitserve-engine", "splitserve-engine", "splitserve-gateway", "splitserve-tokenizer"]

    started = time.time()
    with grpc.insecure_channel(compose_stack.processes["gateway"].address) as channel:
        send_traffic(gateway_pb2_grpc.GatewayStub(channel))
    assert all_up(), prometheus.targets()
    up = prometheus.get("/api/v1/query", query='up{job=~"splitserve-.*"}')["result"]
    assert len(up) == 4 and all(sample["value"][1] == "1" for sample in up)

    # The dashboard's engine variable: label_values(splitserve_engine_requests_running, instance).
    series = prometheus.get("/api/v1/series", **{"match[]": "splitserve_engine_requests_running"})
    instances = sorted({s["instance"] for s in series})
    assert instances == sorted(f"127.0.0.1:{p.metrics_port}" for p in compose_stack.engines)

    # The rules load and evaluate (recording rules give data too).
    groups = prometheus.get("/api/v1/rules")["groups"]
    assert {g["name"] for g in groups} == {"splitserve.recording", "splitserve.alerts"}
    assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups

    empty = []
    checked = 0
    for title, legend, expr in panel_queries():
        expr = expr.replace("$__rate_interval", RATE_INTERVAL)
        for instance in instances if "$instance" in expr else [None]:
            query = expr if instance is None else expr.replace("$instance", instance)
            data = prometheus.get("/api/v1/query_range", query=query, start=started, end=time.time(), step=1)
            values = [float(v) for s in data["result"] for _, v in s["values"]]
            checked += 1
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title} / {legend}: {query} -> {data['result']!r:.200}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert checked >= 45
