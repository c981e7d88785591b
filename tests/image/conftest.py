"""The image test's two stacks (`make image-test`; `make test` leaves tests/image out, it needs the built image).

From the image: the tokenizer, engine and gateway run from the image `make image` built (SPLITSERVE_IMAGE), each a
`buildah run` in one working container, with the command and environment that `docker-compose config` renders,
changed only as the deploy tests change them (loopback host, free ports of this machine's network, the other
services' addresses); the model cache is a folder of this machine (SPLITSERVE_IMAGE_MODELS) mounted at /models, so
the default model is converted once, not in every run. On this machine: the same stack as `make run` starts it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.stack import Ports, Stack, free_port
from tests.deploy.conftest import Process, compose_config, health_args, loopback_env

IMAGE = os.environ.get("SPLITSERVE_IMAGE", "localhost/splitserve:cpu")
MODELS = Path(os.environ.get("SPLITSERVE_IMAGE_MODELS", Path.home() / ".cache" / "splitserve" / "image-models"))
IMAGE_UID = 1000
SERVICES = ("tokenizer", "engine", "gateway")


def buildah_command(*args: str) -> list[str]:
    """Debian's buildah, as `make image` uses it (deploy/install-tools.sh installs it)."""
    binary = shutil.which("buildah")
    if binary is None:
        raise AssertionError("buildah is not installed: run `bash deploy/install-tools.sh` (as .ci/run does)")
    return [binary, *args]


def buildah(*args: str) -> str:
    result = subprocess.run(buildah_command(*args), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def run_in(container: str, env: dict[str, str] | None = None) -> list[str]:
    """The prefix of a command run inside the container: its image's user, environment and working directory, this
    machine's network (chroot isolation shares it), the model cache mounted at /models."""
    flags = [f"--env={key}={value}" for key, value in (env or {}).items()]
    return buildah_command("run", "--isolation", "chroot", f"--volume={MODELS}:/models", *flags, container, "--")


@dataclass
class ImageStack:
    container: str
    processes: dict[str, Process]
    http_port: int

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """A command inside the image, as the services run."""
        return subprocess.run([*run_in(self.container), *command], capture_output=True, text=True, timeout=300)

    def stop(self) -> None:
        for name in reversed(SERVICES):
            self.processes[name].stop()


def build_image_stack(container: str, compose: dict, log_dir: Path) -> ImageStack:
    ports = {name: (free_port(), free_port()) for name in SERVICES}
    upstreams = {"http_port": str(free_port()), "tokenizer": f"127.0.0.1:{ports['tokenizer'][0]}",
                 "engine": f"127.0.0.1:{ports['engine'][0]}"}
    processes = {}
    for name, (grpc_port, metrics_port) in ports.items():
        service = compose["services"][name]
        env = {key: str(value) for key, value in service["environment"].items()}
        env.update(loopback_env(name, grpc_port, metrics_port, upstreams))
        health = [*run_in(container), *health_args(service, name, f"127.0.0.1:{grpc_port}")]
        processes[name] = Process(name, [*run_in(container, env), *service["command"]], dict(os.environ), health,
                                  grpc_port, metrics_port, log_dir / f"{name}.log")
    return ImageStack(container, processes, int(upstreams["http_port"]))


@pytest.fixture(scope="session")
def image_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStack]:
    inspect = subprocess.run(buildah_command("inspect", "--type", "image", IMAGE), capture_output=True)
    assert inspect.returncode == 0, f"no image {IMAGE}: build it with `make image` (`make image-test` does)"
    MODELS.mkdir(parents=True, exist_ok=True)
    os.chown(MODELS, IMAGE_UID, IMAGE_UID)   # the services write the converted model there as the image's user
    container = buildah("from", "--pull-never", "--name", f"splitserve-image-test-{os.getpid()}", IMAGE).strip()
    # buildah run mounts the image's own anonymous /models volume over a bind mount there; compose's named volume
    # replaces it, and so does this container without it.
    buildah("config", "--volume", "/models-", container)
    stack = build_image_stack(container, compose_config(), tmp_path_factory.mktemp("image-stack-logs"))
    try:
        for process in stack.processes.values():
            process.start()
        for process in stack.processes.values():
            process.wait_healthy(timeout=600)   # the first start converts the default model into the cache
        yield stack
    finally:
        stack.stop()
        buildah("rm", container)


@pytest.fixture(scope="session")
def host_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack as `make run` starts it (common.stack, the default model), on free ports."""
    stack = Stack(ports=Ports.free(), log_dir=tmp_path_factory.mktemp("host-stack-logs"))
    stack.start()
    yield stack
    stack.stop()
