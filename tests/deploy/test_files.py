"""deploy/ validates with the real tools: docker-compose, promtool, kubernetes-validate, hadolint, the dashboard generator."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from common.stack import Stack
from tests.deploy.conftest import COMPOSE_FILE, DEPLOY, GPU_COMPOSE_FILE, REPO, compose_config, tool

DISAGGREGATED_COMPOSE_FILE = DEPLOY / "docker-compose.disaggregated.yml"

SPLITSERVE_SERVICES = ("tokenizer", "engine", "gateway")
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
K8S_FILES = sorted((DEPLOY / "k8s").glob("**/*.yaml"))   # the base manifests and disaggregated/
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "splitserve.json"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def test_compose_config_renders_every_service_with_health_checks_restarts_and_the_model_volume():
    config = compose_config()
    assert set(config["services"]) == {*SPLITSERVE_SERVICES, "prometheus", "grafana"}
    for name in SPLITSERVE_SERVICES:
        service = config["services"][name]
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "common.healthcheck"]
        targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service["volumes"]]
        assert "/models" in targets, service["volumes"]
        assert service["environment"]["MODEL"] == "smollm2"
    gateway = config["services"]["gateway"]
    assert gateway["depends_on"] == {"tokenizer": {"condition": "service_healthy"},
                                     "engine": {"condition": "service_healthy"}}
    assert gateway["environment"]["ENGINE_ADDRESS"] == "dns:///engine:50053"   # every replica of `engine`
    assert {"models", "prometheus-data", "grafana-data"} <= set(config["volumes"])


def test_compose_gpu_override_reserves_gpus_for_the_cuda_engine():
    engine = compose_config(COMPOSE_FILE, GPU_COMPOSE_FILE)["services"]["engine"]
    assert engine["build"]["args"] == {"VARIANT": "cuda"}
    assert engine["environment"]["DEVICE"] == "cuda"
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_and_kubernetes_run_the_commands_the_tests_run():
    """The same `python -m <module>` everywhere: compose, the Kubernetes manifests and the tests' Stack."""
    compose = compose_config()["services"]
    stack_modules = {name: service.args[1] for name, service in Stack().services.items()}
    kubernetes = {}
    for path in K8S_FILES:
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] in ("Deployment", "StatefulSet"):
                container = document["spec"]["template"]["spec"]["containers"][0]
                kubernetes[container["name"]] = container["command"]
    for name in SPLITSERVE_SERVICES:
        assert compose[name]["command"] == ["python", "-m", stack_modules[name]]
        assert kubernetes[name] == compose[name]["command"]


def test_compose_and_kubernetes_run_the_images_make_image_builds():
    """`make image` tags deploy/Dockerfile's build splitserve:<VARIANT> (deploy/image.sh)."""
    assert 'IMAGE=${IMAGE:-splitserve:$VARIANT}' in (DEPLOY / "image.sh").read_text()
    built = {"cpu": "splitserve:cpu", "cuda": "splitserve:cuda"}
    compose = compose_config()["services"]
    gpu_engine = compose_config(COMPOSE_FILE, GPU_COMPOSE_FILE)["services"]["engine"]
    for service in [*(compose[name] for name in SPLITSERVE_SERVICES), gpu_engine]:
        variant = service["build"].get("args", {}).get("VARIANT", "cpu")
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == built[variant]
    for path in K8S_FILES:
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] in ("Deployment", "StatefulSet"):
                assert document["spec"]["template"]["spec"]["containers"][0]["image"] in built.values(), path.name


def test_promtool_checks_the_prometheus_config_and_rules():
    run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    output = run(tool("promtool"), "check", "rules", *map(str, RULE_FILES)).stdout
    assert "SUCCESS" in output


def test_promtool_unit_tests_cover_every_alert():
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
    run(tool("promtool"), "test", "rules", *map(str, tests))
    alerts = {rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    assert {"SplitserveTimeToFirstTokenHigh", "SplitserveErrorRateHigh", "SplitserveKVCacheNearFull",
            "SplitserveWaitingQueueGrowing", "SplitserveTargetDown"} <= alerts
    for alert in alerts:
        cases = [case for path in tests for test in yaml.safe_load(path.read_text())["tests"]
                 for case in test.get("alert_rule_test", []) if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in cases), f"no promtool test sees {alert} fire"
        assert any(not case["exp_alerts"] for case in cases), f"no promtool test sees {alert} stay quiet"


def test_kubernetes_manifests_validate_against_the_schemas():
    output = run(tool("kubernetes-validate"), "--strict", *map(str, K8S_FILES)).stdout
    kinds = set(re.findall(r"passed for resource (\w+)/", output))
    assert {"deployment", "statefulset", "service", "configmap", "networkpolicy"} <= kinds, output


def test_kubernetes_engines_request_gpus_and_every_container_has_grpc_probes_and_resources():
    for path in K8S_FILES:
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = document["spec"]["template"]
            assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
            container = pod["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"], path.name
            liveness = container["livenessProbe"]   # the gateway's: alive even while its upstreams are down
            assert liveness.get("grpc", {}).get("port") == ports["grpc"] or \
                liveness["httpGet"] == {"path": "/health/live", "port": "http"}, path.name
            assert container["resources"]["requests"]
            hardened = container["securityContext"]
            assert hardened["allowPrivilegeEscalation"] is False and hardened["readOnlyRootFilesystem"] is True
            assert hardened["capabilities"]["drop"] == ["ALL"], path.name
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            # SIGTERM comes after the preStop; the service's own drain must end before the pod is killed
            prestop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
            grace = {"gateway": 20, "tokenizer": 30,
                     "engine": int(next((e["value"] for e in container["env"] if e["name"] == "SHUTDOWN_GRACE_SECONDS"),
                                        30)) + 10}[container["name"]]   # the engine joins its step loop (10 s)
            assert prestop + grace < pod["spec"]["terminationGracePeriodSeconds"], path.name
            if container["name"] == "engine":
                assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_hadolint_passes_the_dockerfile_and_its_copies_exist():
    run(tool("hadolint"), str(DEPLOY / "Dockerfile"))
    copies = [line.split()[1:] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    from_context = [words for words in copies if not any(w.startswith("--from=") for w in words)]
    assert from_context, "the Dockerfile copies nothing from the build context"
    for words in from_context:
        for source in [w for w in words if not w.startswith("--")][:-1]:
            assert (REPO / source).exists(), words


def test_the_committed_dashboard_is_what_the_generator_writes():
    run(sys.executable, str(DEPLOY / "grafana" / "dashboard.py"), "--check")


def test_the_readme_describes_every_dashboard_panel_as_the_generator_does():
    panel_list = run(sys.executable, str(DEPLOY / "grafana" / "dashboard.py"), "--markdown").stdout
    assert panel_list in (REPO / "README.md").read_text(), "README's Dashboard panels: paste dashboard.py --markdown"
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert f"- **{panel['title'].replace(' ($instance)', '')}**: {panel['description']}" in panel_list


@pytest.mark.parametrize("metric", [
    "splitserve_request_phase_seconds", "splitserve_time_to_first_token_seconds",
    "splitserve_inter_token_latency_seconds", "splitserve_e2e_request_latency_seconds", "splitserve_requests_total",
    "splitserve_prompt_tokens_total", "splitserve_generation_tokens_total", "splitserve_requests_in_flight",
    "splitserve_engine_step_seconds", "splitserve_engine_batch_size", "splitserve_engine_requests_running",
    "splitserve_engine_requests_waiting", "splitserve_engine_kv_cache_usage_ratio",
    "splitserve_engine_prefix_cache_hits_total", "splitserve_engine_prefix_cache_queries_total",
    "splitserve_engine_preemptions_total", "splitserve_tokenizer_seconds"])
def test_the_dashboard_shows_every_contract_metric(metric):
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    assert any(re.search(rf"\b{metric}(_bucket|_sum|_count)?\b", expr) for expr in exprs)


def test_network_policies_let_only_the_gateway_reach_the_tokenizer_and_the_engines():
    policies = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all((DEPLOY / "k8s" / "network-policy.yaml")
                                                                            .read_text())}
    for name, port in (("splitserve-engine", 50053), ("splitserve-tokenizer", 50052)):
        rules = policies[name]["ingress"]
        grpc_rule = next(r for r in rules if {"protocol": "TCP", "port": port} in r["ports"])
        assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "splitserve-gateway"}}}]
        assert all(port not in [p["port"] for p in r["ports"]] for r in rules if r is not grpc_rule)


def test_compose_tls_override_mounts_certificates_and_turns_on_mutual_tls():
    services = compose_config(COMPOSE_FILE, DEPLOY / "docker-compose.tls.yml")["services"]
    for name in ("tokenizer", "engine", "gateway"):
        environment, volumes = services[name]["environment"], services[name]["volumes"]
        assert (environment["TLS_CERT"], environment["TLS_KEY"], environment["TLS_CA"]) == \
            ("/certs/node.pem", "/certs/node.key", "/certs/ca.pem"), name
        assert any(v.endswith(":/certs:ro") for v in volumes), name
        assert "models:/models:rw" in volumes, name   # the override keeps the model volume


def test_the_disaggregated_variants_run_prefill_and_decode_engines_and_point_the_gateway_at_both():
    services = compose_config(COMPOSE_FILE, DISAGGREGATED_COMPOSE_FILE)["services"]
    assert services["prefill"]["command"] == services["engine"]["command"]
    assert services["prefill"]["environment"]["ROLE"] == "prefill" and services["engine"]["environment"]["ROLE"] == "decode"
    assert services["prefill"]["healthcheck"] == services["engine"]["healthcheck"]
    gateway = services["gateway"]
    assert gateway["environment"]["PREFILL_ENGINE_ADDRESS"] == "dns:///prefill:50053"
    assert gateway["environment"]["ENGINE_ADDRESS"] == "dns:///engine:50053"
    assert gateway["depends_on"]["prefill"] == {"condition": "service_healthy"}
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    engine_job = next(job for job in scrape if job["job_name"] == "splitserve-engine")
    assert ["prefill"] in [sd["names"] for sd in engine_job["dns_sd_configs"]]

    documents = [d for path in sorted((DEPLOY / "k8s").glob("**/*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    config = by_name[("ConfigMap", "splitserve-disaggregated")]["data"]
    prefill = by_name[("StatefulSet", "splitserve-prefill")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "ROLE", "value": "prefill"} in prefill["env"]
    service = by_name[("Service", "splitserve-prefill")]["spec"]
    assert service["clusterIP"] == "None" and config["ROLE"] == "decode"
    assert config["PREFILL_ENGINE_ADDRESS"] == f"dns:///splitserve-prefill:{service['ports'][0]['port']}"
    for kind, name in (("StatefulSet", "splitserve-engine"), ("Deployment", "splitserve-gateway")):
        container = by_name[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": "splitserve-disaggregated", "optional": True}} in container["envFrom"]
    policy = by_name[("NetworkPolicy", "splitserve-prefill")]["spec"]["ingress"][0]
    callers = [rule["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for rule in policy["from"]]
    assert sorted(callers) == ["splitserve-engine", "splitserve-gateway"]
