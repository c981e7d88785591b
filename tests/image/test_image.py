"""The container image built and run for real: the three services from the image answer as the same stack started
on this machine does (`make image-test` builds the CPU image, then runs these)."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from common.healthcheck import check
from tests.helpers import make_request, stream
from tests.image.conftest import IMAGE, IMAGE_UID, MODELS, SERVICES, ImageStack, buildah
from splitserve.v1 import gateway_pb2_grpc

PROMPTS = ["The capital of France is", [("user", "Name three colours. 你好 👋")]]
MAX_TOKENS = 24
MAX_IMAGE_BYTES = 2.5e9
# Each service's own metric family, as the dashboard reads it.
SERVICE_METRICS = {"tokenizer": "splitserve_tokenizer_seconds", "engine": "splitserve_engine_step_seconds",
                   "gateway": "splitserve_requests_total"}


def greedy(address: str, prompt) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        got = stream(gateway_pb2_grpc.GatewayStub(channel), make_request(prompt, max_tokens=MAX_TOKENS, temperature=0))
    assert got.last.finish_reason in ("stop", "length") and got.token_ids
    return got.token_ids


def post(port: int, route: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def http_greedy(port: int) -> tuple[dict, dict]:
    """A completion and a chat completion, greedy, with each token's bytes (the HTTP API's view of the ids)."""
    completion = post(port, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    chat = post(port, "/v1/chat/completions", {"messages": [{"role": r, "content": c} for r, c in PROMPTS[1]],
                                               "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True})
    return completion, chat


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        return reply.read().decode()


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (buildah run → its chroot child → python), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_health_is_serving_on_all_three_and_the_compose_health_checks_pass_inside(image_stack: ImageStack):
    for name in SERVICES:
        process = image_stack.processes[name]
        assert check(process.address) == "SERVING", name
        assert process.healthy(), f"{name}: {process.health}"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["prompt", "chat"])
def test_greedy_token_ids_through_the_image_equal_the_host_stacks(image_stack: ImageStack, host_stack, prompt):
    assert greedy(image_stack.processes["gateway"].address, prompt) == greedy(host_stack.address("gateway"), prompt)


def test_greedy_through_the_openai_api_equals_the_host_stack_and_the_grpc_text(image_stack: ImageStack, host_stack):
    completion, chat = http_greedy(image_stack.http_port)
    host_completion, host_chat = http_greedy(host_stack.ports.gateway_http)
    assert completion["choices"][0]["text"] == host_completion["choices"][0]["text"] != ""
    assert completion["usage"] == host_completion["usage"]
    image_tokens = [t["bytes"] for t in chat["choices"][0]["logprobs"]["content"]]
    assert image_tokens == [t["bytes"] for t in host_chat["choices"][0]["logprobs"]["content"]]
    assert chat["choices"][0]["message"] == host_chat["choices"][0]["message"]
    assert len(image_tokens) == chat["usage"]["completion_tokens"] > 0


def test_prometheus_metrics_of_each_service_are_scraped_from_the_host(image_stack: ImageStack):
    greedy(image_stack.processes["gateway"].address, PROMPTS[0])
    for name, metric in SERVICE_METRICS.items():
        text = scrape(image_stack.processes[name].metrics_port)
        counts = re.findall(rf"^{metric}(?:_count)?(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        assert counts and sum(float(c) for c in counts) >= 1, f"{name}: no {metric} samples"


def test_the_services_run_as_the_images_non_root_user(image_stack: ImageStack):
    for name, module in zip(SERVICES, ("tokenizer_service", "engine_service", "gateway")):
        process = image_stack.processes[name].process
        assert process is not None
        pythons = [pid for pid in descendants(process.pid)
                   if f"-m\0{module}\0" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert pythons, f"no python -m {module} under buildah run {process.pid}"
        for pid in pythons:
            uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("Uid:")).split()[1:]
            assert uids == [str(IMAGE_UID)] * 4, (name, uids)


def test_the_runtime_image_has_no_compiler_and_the_cpu_build_of_torch(image_stack: ImageStack):
    tools = image_stack.run("python", "-c", "import shutil; print([t for t in ('cc', 'c++', 'gcc', 'g++', 'clang', "
                                            "'clang++', 'ld') if shutil.which(t)])")
    assert tools.returncode == 0 and tools.stdout.strip() == "[]", tools.stdout + tools.stderr
    torch = image_stack.run("python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert torch.stdout.split() == ["2.13.0+cpu", "None"], torch.stdout + torch.stderr


def test_the_engine_in_the_image_loads_our_prebuilt_cpu_kernels(image_stack: ImageStack):
    avx2 = "avx2" in Path("/proc/cpuinfo").read_text().split()
    log = image_stack.processes["engine"].log_path.read_text(errors="replace")
    assert ("CPU kernels loaded" in log) == avx2, image_stack.processes["engine"].log_tail()


def test_the_default_model_is_converted_into_the_mounted_cache_by_the_images_user(image_stack: ImageStack):
    converted = [path for path in (MODELS / "splitserve" / "models").iterdir() if (path / "config.json").exists()]
    assert converted, f"no converted model under {MODELS}"
    assert all(path.stat().st_uid == IMAGE_UID for path in converted)


def test_the_cpu_image_is_at_most_2_5_gb():
    layers = json.loads(buildah("inspect", "--type", "image", "--format", "{{.Manifest}}", IMAGE))["layers"]
    size = sum(layer["size"] for layer in layers)   # uncompressed, as `docker images` counts
    print(f"{IMAGE}: {size / 1e9:.2f} GB")
    assert size <= MAX_IMAGE_BYTES
