"""Safety on a network: API keys on the public gateway (both APIs), TLS with mutual TLS on the internal channels,
cross-site POSTs and oversized bodies refused, and readiness that says SERVING only while a request can succeed."""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.security import TlsFiles, sync_channel
from common.stack import Ports, Stack
from tests.helpers import make_request, prompt_ids, reference_greedy, rpc_error, start_extra_gateway, stream
from tests.integration.test_lifecycle import wait_until
from splitserve.v1 import engine_pb2, gateway_pb2_grpc

KEY, OTHER_KEY = "sk-test-0123456789", "sk-second-key"


def http(port: int, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         scheme: str = "http", context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(address: str, tls: TlsFiles | None = None) -> str:
    with sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---- API keys -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(tiny_stack, tmp_path_factory):
    """A gateway with two keys (one from the flag, one from a key file) in front of the tiny stack."""
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "keys"
    key_file.write_text(f"# accepted keys\n{OTHER_KEY}\n\n")
    extra = start_extra_gateway(tiny_stack, folder / "logs", ["--api-key", KEY, "--api-key-file", str(key_file)])
    yield extra
    extra.stop()


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.ports.gateway_http}/v1", api_key=key, max_retries=0,
                         timeout=120)


def test_the_openai_sdk_with_a_key_works_and_without_one_gets_401(keyed):
    for key in (KEY, OTHER_KEY):
        reply = sdk(keyed, key).completions.create(model="", prompt="hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
    for key in ("wrong", KEY + "x", KEY[:-1]):
        client = sdk(keyed, key)
        with pytest.raises(openai.AuthenticationError) as info:
            client.completions.create(model="", prompt="hello", max_tokens=3)
        assert info.value.status_code == 401 and info.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_every_http_route_but_health_and_metrics_needs_the_key(keyed):
    port = keyed.ports.gateway_http
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, reply = http(port, path, body, {"Content-Type": "application/json"})
        assert status == 401 and "API key" in reply["error"]["message"]
    assert http(port, "/v1/models")[0] == 401
    assert http(port, "/v1/models", headers={"Authorization": "Basic " + KEY})[0] == 401
    assert http(port, "/v1/models", headers={"Authorization": "Bearer " + KEY})[0] == 200
    assert http(port, "/health")[0] == 200 and http(port, "/health/live")[0] == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200


def test_grpc_needs_the_key_but_health_does_not(keyed):
    with grpc.insecure_channel(keyed.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", KEY)]):
            error = rpc_error(lambda: stub.Generate(make_request("hi", max_tokens=2), timeout=60, metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
        good = stub.Generate(make_request("hi", max_tokens=2), timeout=60,
                             metadata=[("authorization", f"Bearer {OTHER_KEY}")])
        assert list(good)[-1].finish_reason
    assert health(keyed.address("gateway")) == "SERVING"


def test_the_cli_client_takes_the_key_from_a_flag_or_the_environment(keyed):
    base = [sys.executable, "-m", "gateway.client", "--address", keyed.address("gateway"), "--max-tokens", "3", "hi"]
    root = Path(__file__).resolve().parents[2]
    refused = subprocess.run(base, capture_output=True, text=True, cwd=root, timeout=120)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    flag = subprocess.run([*base, "--api-key", KEY], capture_output=True, text=True, cwd=root, timeout=120)
    assert flag.returncode == 0, flag.stderr
    env = subprocess.run(base, capture_output=True, text=True, cwd=root, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "SPLITSERVE_API_KEY": OTHER_KEY})
    assert env.returncode == 0, env.stderr


def test_the_start_up_log_never_prints_the_key(keyed):
    log = keyed.services["gateway"].log_path.read_text()
    assert "api_key=<set>" in log and KEY not in log


def test_one_key_cannot_hold_more_than_its_share_of_requests(tiny_stack, tmp_path_factory):
    """--max-requests-per-client 2: a key's third open request is refused (gRPC RESOURCE_EXHAUSTED, HTTP 429), another
    key is served meanwhile, and the key gets its slot back once one of its streams ends."""
    folder = tmp_path_factory.mktemp("capped")
    key_file = folder / "keys"
    key_file.write_text(f"{OTHER_KEY}\n")
    capped = start_extra_gateway(tiny_stack, folder / "logs", ["--api-key", KEY, "--api-key-file", str(key_file),
                                                               "--max-requests-per-client", "2",
                                                               "--stream-write-timeout-seconds", "600"])
    mine, other = [("authorization", f"Bearer {KEY}")], [("authorization", f"Bearer {OTHER_KEY}")]
    # The two held streams are never read on a connection with a tiny receive window: they stay open however fast
    # the machine is (the write timeout is long), so the cap is reached for as long as the test needs.
    stalled_channel = grpc.insecure_channel(capped.address("gateway"), options=[
        ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
    try:
        long = make_request("a very long story:", max_tokens=1900, n=16, temperature=1.0, ignore_eos=True)
        held = [gateway_pb2_grpc.GatewayStub(stalled_channel).Generate(long, metadata=mine) for _ in range(2)]
        for call in held:
            next(call)                      # both are running: each counts against its key
        with grpc.insecure_channel(capped.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            error = rpc_error(lambda: list(stub.Generate(make_request("hi", max_tokens=2), timeout=60, metadata=mine)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-requests-per-client" in error.details()
            body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
            status, reply = http(capped.ports.gateway_http, "/v1/completions", body,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            assert status == 429 and "requests open" in reply["error"]["message"]
            served = list(stub.Generate(make_request("hi", max_tokens=2), timeout=60, metadata=other))
            assert served[-1].finish_reason == "length"
            held[0].cancel()

            def my_request_is_served() -> bool:
                try:
                    return bool(list(stub.Generate(make_request("hi", max_tokens=2), timeout=60, metadata=mine)))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
            assert wait_until(my_request_is_served, 60)
            held[1].cancel()
    finally:
        stalled_channel.close()
        capped.stop()


# ---- cross-site posts and body size ---------------------------------------------------------------------------

def test_a_post_that_is_not_json_is_refused_415(tiny_stack):
    port = tiny_stack.ports.gateway_http
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, reply = http(port, "/v1/completions", body, {"Content-Type": content_type})
        assert status == 415 and "application/json" in reply["error"]["message"]
    assert http(port, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_a_body_over_the_limit_is_refused_413_and_the_next_request_is_served(tiny_stack):
    port = tiny_stack.ports.gateway_http
    huge = json.dumps({"prompt": "x" * (3 << 20), "max_tokens": 2}).encode()   # 3 MiB: over the 2 MiB default
    status, reply = http(port, "/v1/completions", huge, {"Content-Type": "application/json"})
    assert status == 413 and reply["error"]["type"] == "invalid_request_error"
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    assert http(port, "/v1/completions", body, {"Content-Type": "application/json"})[0] == 200


# ---- TLS ------------------------------------------------------------------------------------------------------

def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a certificate for 127.0.0.1 (servers and the gateway as client), and a stranger's CA."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    for ca in ("ca", "stranger-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    for name, ca in (("node", "ca"), ("stranger", "stranger-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", f"{name}.pem")
    return {name: folder / name for name in ("ca.pem", "node.pem", "node.key", "stranger.pem", "stranger.key")}


@pytest.fixture(scope="module")
def tls_stack(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder)
    tls = ["--tls-cert", str(certs["node.pem"]), "--tls-key", str(certs["node.key"]), "--tls-ca", str(certs["ca.pem"])]
    stack = Stack(model=str(tiny_model_dir), ports=Ports.free(), log_dir=folder / "logs",
                  engine_args=["--small-step-bf16", "false", *tls], tokenizer_args=tls, gateway_args=tls,
                  tls=TlsFiles(str(certs["node.pem"]), str(certs["node.key"]), str(certs["ca.pem"])))
    stack.start()
    yield stack, certs
    stack.stop()


def test_a_greedy_request_runs_end_to_end_over_tls(tls_stack, tiny_model, tokenizer):
    stack, certs = tls_stack
    expected = reference_greedy(tiny_model, prompt_ids(tokenizer, "The sea is"), 8)
    client_tls = TlsFiles(ca=str(certs["ca.pem"]))   # the public port asks for no client certificate
    with sync_channel(stack.address("gateway"), client_tls) as channel:
        got = stream(gateway_pb2_grpc.GatewayStub(channel), make_request("The sea is", max_tokens=8))
    assert got.token_ids == expected
    context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
    body = json.dumps({"prompt": "The sea is", "max_tokens": 8, "temperature": 0}).encode()
    status, reply = http(stack.ports.gateway_http, "/v1/completions", body, {"Content-Type": "application/json"},
                         scheme="https", context=context)
    assert status == 200 and reply["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_plaintext_and_certificate_less_callers_are_refused_everywhere(tls_stack):
    stack, certs = tls_stack
    for name in ("gateway", "tokenizer", "engine"):
        assert health(stack.address(name)) == "UNAVAILABLE", name    # plaintext
    no_certificate = TlsFiles(ca=str(certs["ca.pem"]))
    stranger = TlsFiles(str(certs["stranger.pem"]), str(certs["stranger.key"]), str(certs["ca.pem"]))
    for name in ("tokenizer", "engine"):   # mutual TLS: only holders of a certificate the CA signed
        assert health(stack.address(name), no_certificate) == "UNAVAILABLE", name
        assert health(stack.address(name), stranger) == "UNAVAILABLE", name
        assert health(stack.address(name), stack.tls) == "SERVING", name
    with pytest.raises(OSError):   # HTTP API: TLS only (a reset or a refused handshake)
        urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.gateway_http}/health", timeout=30).read()


# ---- readiness ------------------------------------------------------------------------------------------------

def test_the_gateway_is_ready_only_while_a_tokenizer_and_an_engine_answer(tiny_model_dir, tmp_path):
    stack = Stack(model=str(tiny_model_dir), ports=Ports.free(), log_dir=tmp_path,
                  engine_args=["--small-step-bf16", "false"])
    gateway, port = stack.address("gateway"), stack.ports.gateway_http
    try:
        stack.start_service("gateway", timeout=120, ready=False)   # first, alone
        assert health(gateway) == "NOT_SERVING"
        assert http(port, "/health")[0] == 503 and http(port, "/health/live")[0] == 200
        stack.start_service("tokenizer")
        assert health(gateway) == "NOT_SERVING"    # an engine is still missing
        stack.start_service("engine")
        assert wait_until(lambda: health(gateway) == "SERVING", timeout=120)
        assert http(port, "/health")[0] == 200
        with grpc.insecure_channel(gateway) as channel:
            assert stream(gateway_pb2_grpc.GatewayStub(channel), make_request("hi", max_tokens=2)).last.finish_reason
        stack.services["engine"].process.kill()
        stack.services["engine"].process.wait()
        assert wait_until(lambda: health(gateway) == "NOT_SERVING", timeout=120)
        assert http(port, "/health")[0] == 503
        stack.start_service("engine")
        assert wait_until(lambda: health(gateway) == "SERVING", timeout=120)
    finally:
        stack.stop()


# ---- clients that stop reading --------------------------------------------------------------------------------

def stalled_http_client(port: int, body: bytes) -> socket.socket:
    """Sends a streaming request over a socket with a tiny receive buffer, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


@pytest.mark.slow
def test_clients_that_stop_reading_lose_their_streams_and_free_slots_and_kv(tiny_stack, engine, tmp_path):
    """20 HTTP and 20 gRPC streams of n=16 that are never read: each write waits at most the write timeout, then
    the stream is dropped and its 16 sequences aborted; a normal request is served meanwhile."""
    extra = start_extra_gateway(tiny_stack, tmp_path / "logs", ["--stream-write-timeout-seconds", "2",
                                                                "--max-concurrent-requests", "1024"])
    idle = engine.GetStats(engine_pb2.GetStatsRequest())
    metrics = f"http://127.0.0.1:{extra.ports.gateway_http}/metrics"
    body = json.dumps({"prompt": "a very long story:", "max_tokens": 1900, "n": 16, "stream": True,
                       "temperature": 1.0, "ignore_eos": True}).encode()
    # a small receive window (as a slow phone's), so that the streams stall after a few tokens
    stalled_channel = grpc.insecure_channel(extra.address("gateway"), options=[
        ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
    try:
        sockets = [stalled_http_client(extra.ports.gateway_http, body) for _ in range(20)]
        stub = gateway_pb2_grpc.GatewayStub(stalled_channel)
        calls = [stub.Generate(make_request("a very long story:", max_tokens=1900, n=16, temperature=1.0,
                                            ignore_eos=True)) for _ in range(20)]
        with grpc.insecure_channel(extra.address("gateway")) as channel:   # its own connection: not stalled
            normal = stream(gateway_pb2_grpc.GatewayStub(channel), make_request("hello", max_tokens=4), timeout=600)
        assert normal.last.finish_reason in ("stop", "length")

        def stalled() -> float:
            return scrape_url(metrics).get("splitserve_stalled_clients_total", 0.0)

        assert wait_until(lambda: stalled() == 40, timeout=600), stalled()
        assert wait_until(lambda: scrape_url(metrics)["splitserve_requests_in_flight"] == 0, timeout=60)
        assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()) == idle, timeout=60)
        for call in calls:   # its status waits behind the messages it never read: end it from this side
            call.cancel()
        for sock in sockets:
            sock.close()
    finally:
        stalled_channel.close()
        extra.stop()


def scrape_url(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}
