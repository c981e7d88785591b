"""Starts tokenizer, engine and gateway as processes, waits until all are healthy, stops them together.

`python -m common.stack` is what `make run` runs; the integration tests use `Stack` to start the real servers.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.security import TlsFiles, sync_channel


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()          # ports this process gave out already (a bound-and-closed port looks free)
_random = random.Random(os.urandom(8))


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


def free_port() -> int:
    """A port nobody listens on, outside the kernel's ephemeral range. A port the kernel picks (bind to port 0) lies
    in that range, so between this choice and the service's bind any outgoing connection (a health check, a client)
    may take it as its source port: a fresh-clone CI run lost a TLS stack to 'Address already in use' that way."""
    low, high = _ephemeral_range()
    spans = [span for span in (range(10000, low), range(high + 1, 65536)) if len(span) >= 1000]
    for _ in range(200 if spans else 0):
        span = _random.choice(spans)
        port = span[_random.randrange(len(span))]
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:          # no room outside the range: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    gateway: int = 50051
    gateway_metrics: int = 9100
    tokenizer: int = 50052
    tokenizer_metrics: int = 9101
    engine: int = 50053
    engine_metrics: int = 9102
    gateway_http: int = 8000           # the OpenAI-compatible HTTP API

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in fields(cls)))


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def wait_serving(address: str, timeout: float, alive: subprocess.Popen[bytes] | None = None,
                 tls: TlsFiles | None = None, ready: bool = True) -> None:
    """Polls grpc.health.v1 until the server says SERVING (or, with ready=False, answers at all: a gateway whose
    upstreams are down is up but NOT_SERVING); fails early if its process died."""
    deadline = time.monotonic() + timeout
    with sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if alive is not None and alive.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with code {alive.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING or not ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} was not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


@dataclass
class Stack:
    model: str = "smollm2"
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    engine_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None        # None: the services write to this process's stdout/stderr
    tokenizer_address: str = ""        # the gateway's upstreams: default, this stack's own services
    engine_address: str = ""
    tokenizer_args: list[str] = field(default_factory=list)
    tls: TlsFiles | None = None        # how this process reaches the services (their health checks)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p, common = self.ports, ["--host", self.host]
        self.services = {
            "tokenizer": Service("tokenizer", ["-m", "tokenizer_service", *common, "--model", self.model,
                                               "--port", str(p.tokenizer), "--metrics-port", str(p.tokenizer_metrics),
                                               *self.tokenizer_args],
                                 p.tokenizer),
            "engine": Service("engine", ["-m", "engine_service", *common, "--model", self.model,
                                         "--port", str(p.engine), "--metrics-port", str(p.engine_metrics),
                                         *self.engine_args], p.engine),
            "gateway": Service("gateway", ["-m", "gateway", *common, "--port", str(p.gateway),
                                           "--metrics-port", str(p.gateway_metrics), "--http-port", str(p.gateway_http),
                                           "--tokenizer-address", self.tokenizer_address or f"127.0.0.1:{p.tokenizer}",
                                           "--engine-address", self.engine_address or f"127.0.0.1:{p.engine}",
                                           *self.gateway_args],
                               p.gateway),
        }

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.services[name].port}"

    def _spawn(self, name: str) -> None:
        service = self.services[name]
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            service.log_path = self.log_dir / f"{name}.log"
            out = open(service.log_path, "ab")
        service.process = subprocess.Popen([sys.executable, *service.args], stdout=out, stderr=out,
                                           cwd=Path(__file__).resolve().parent.parent)
        if out is not None:
            out.close()  # the child holds its own copy

    def _wait(self, name: str, timeout: float, ready: bool = True) -> None:
        try:
            wait_serving(self.address(name), timeout, self.services[name].process, self.tls, ready)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{self.log_tail(name)}") from None

    def start_service(self, name: str, timeout: float = 300, ready: bool = True) -> None:
        """(Re)starts one service, e.g. after a test killed it; ready=False waits only until it answers."""
        self._spawn(name)
        self._wait(name, timeout, ready)

    def start(self, timeout: float = 300) -> None:
        """Starts all three at once (tokenizer and engine load in parallel) and waits until each is SERVING."""
        names = ("tokenizer", "engine", "gateway")
        for name in names:
            self._spawn(name)
        try:
            for name in names:
                self._wait(name, timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        process = self.services[name].process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self) -> None:
        for name in ("gateway", "engine", "tokenizer"):
            self.stop_service(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.services[name].log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> None:
    model = os.environ.get("MODEL") or "smollm2"
    stack = Stack(model=model, host=os.environ.get("HOST", "127.0.0.1"))
    print(f"starting splitserve with model {model!r} (the first start converts the default model, ~30 s)...",
          flush=True)
    try:
        stack.start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    p = stack.ports
    print(f"""
splitserve is up:
  gateway    grpc 127.0.0.1:{p.gateway}   metrics http://127.0.0.1:{p.gateway_metrics}/metrics
             OpenAI API http://127.0.0.1:{p.gateway_http}/v1   (completions, chat/completions, models)
  tokenizer  grpc 127.0.0.1:{p.tokenizer}   metrics http://127.0.0.1:{p.tokenizer_metrics}/metrics
  engine     grpc 127.0.0.1:{p.engine}   metrics http://127.0.0.1:{p.engine_metrics}/metrics
try:  .venv/bin/python -m gateway.client --chat "What is the capital of France?"
Ctrl-C stops all three.""", flush=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping:
        for name, service in stack.services.items():
            if service.process is not None and service.process.poll() is not None:
                print(f"{name} exited with code {service.process.returncode}; stopping", file=sys.stderr)
                stopping = True
        time.sleep(0.5)
    print("stopping...", flush=True)
    stack.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
