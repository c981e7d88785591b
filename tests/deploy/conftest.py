"""The deploy tests' stack: the services started with exactly the commands and environment of docker-compose.yml.

`docker-compose config` (the project's pinned docker-compose) renders the compose file; each service's `command`
runs here as a process with its compose `environment`, changed only where a container differs from this machine:
loopback host, free ports, the tiny test model, the addresses of the other processes and two engines instead of
one. Readiness is the compose health check command itself. The scale-out and observability tests share it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from common.healthcheck import check
from common.stack import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
GPU_COMPOSE_FILE = DEPLOY / "docker-compose.gpu.yml"
# What a container has and this machine has not: paths under the /models volume.
CONTAINER_ONLY_ENV = ("SPLITSERVE_CACHE", "HF_HOME")


def tool(name: str) -> str:
    """A command-line tool .ci/run installs (or the venv's): its path, or a clear failure, never a skip."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise AssertionError(f"{name} is not installed: run `bash deploy/install-tools.sh` (as .ci/run does)")


def compose_config(*files: Path) -> dict:
    """`docker-compose -f ... config`, rendered with no settings from this machine's environment."""
    args = [tool("docker-compose")]
    for path in files or (COMPOSE_FILE,):
        args += ["-f", str(path)]
    result = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=REPO, timeout=60,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def container_command(command: list[str]) -> list[str]:
    """The container's `python -m ...` with this interpreter (the image's python is the same code)."""
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


@dataclass
class Process:
    """One service as its container would run it: command, environment, health check; ports mapped to free ones."""
    name: str
    command: list[str]
    env: dict[str, str]
    health: list[str]
    port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO, stdout=log, stderr=log)

    def healthy(self) -> bool:
        """The container's health check command, run as it is."""
        return subprocess.run(self.health, cwd=REPO, capture_output=True, timeout=30).returncode == 0

    def wait_healthy(self, timeout: float = 300) -> None:
        """Polls in-process with the health check's own code (a process per poll would starve the 2 cores the
        services load on), then runs the health check command once."""
        deadline = time.monotonic() + timeout
        while check(self.address, timeout=1.0) != "SERVING":
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        assert self.healthy(), f"{self.name}: the health check command failed: {self.health}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ComposeStack:
    """tokenizer, engine-1, engine-2 and a gateway routing over both."""
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def engines(self) -> list[Process]:
        return [p for name, p in self.processes.items() if name.startswith("engine")]

    def start(self) -> None:
        for process in self.processes.values():
            process.start()
        try:
            for process in self.processes.values():
                process.wait_healthy()
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        for name in ("gateway", "engine-1", "engine-2", "tokenizer"):
            self.processes[name].stop()


# The gRPC port each service listens on inside its container (its health check names it).
CONTAINER_PORTS = {"tokenizer": 50052, "engine": 50053, "gateway": 50051}


def loopback_env(kind: str, port: int, metrics_port: int, upstreams: dict[str, str]) -> dict[str, str]:
    """What a service's compose environment changes to on this machine's one network: loopback host, free ports,
    and for the gateway its HTTP port and the tokenizer and engine addresses (`upstreams`) instead of DNS names."""
    if kind == "tokenizer":
        return {"HOST": "127.0.0.1", "TOKENIZER_PORT": str(port), "TOKENIZER_METRICS_PORT": str(metrics_port)}
    if kind == "engine":
        return {"ENGINE_HOST": "127.0.0.1", "ENGINE_PORT": str(port), "ENGINE_METRICS_PORT": str(metrics_port)}
    return {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "GATEWAY_METRICS_PORT": str(metrics_port),
            "HTTP_PORT": upstreams["http_port"], "TOKENIZER_ADDRESS": upstreams["tokenizer"],
            "ENGINE_ADDRESS": upstreams["engine"]}


def health_args(service: dict, kind: str, address: str) -> list[str]:
    """The service's compose health check command (without "CMD"), pointed at `address`."""
    health = [a.replace(f"127.0.0.1:{CONTAINER_PORTS[kind]}", address) for a in service["healthcheck"]["test"][1:]]
    assert address in health, f"{kind}'s health check does not check its own gRPC port: {health}"
    return health


def build_compose_stack(compose: dict, model: Path, log_dir: Path) -> ComposeStack:
    services = compose["services"]
    ports = {name: (free_port(), free_port()) for name in ("tokenizer", "engine-1", "engine-2", "gateway")}
    address = {name: f"127.0.0.1:{grpc_port}" for name, (grpc_port, _) in ports.items()}
    upstreams = {"http_port": str(free_port()), "tokenizer": address["tokenizer"],
                 "engine": f"{address['engine-1']},{address['engine-2']}"}
    stack = ComposeStack()
    for name, (grpc_port, metrics_port) in ports.items():
        kind = name.split("-")[0]
        service = services[kind]
        env = {k: v for k, v in os.environ.items() if k not in CONTAINER_ONLY_ENV}
        env.update({k: str(v) for k, v in service["environment"].items() if k not in CONTAINER_ONLY_ENV})
        env.update(loopback_env(kind, grpc_port, metrics_port, upstreams))
        env["MODEL"] = str(model)
        if kind == "engine":
            env["KV_CACHE_GB"] = "0.25"
        health = container_command(health_args(service, kind, address[name]))
        stack.processes[name] = Process(name, container_command(service["command"]), env, health, grpc_port,
                                        metrics_port, log_dir / f"{name}.log")
    return stack


@pytest.fixture(scope="session")
def compose_stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    stack = build_compose_stack(compose_config(), tiny_model_dir, tmp_path_factory.mktemp("compose-stack-logs"))
    stack.start()
    yield stack
    stack.stop()
