"""Which engine serves a request: several engines behind one gateway.

`--engine-address` is one target or a comma-separated list; a target is `host:port` or `dns:///name:port`
(every address the name resolves to is one engine, re-resolved as the health checks run: a Kubernetes headless
Service). For each request the router keeps to the healthy engines, prefers the one that already served the
longest prefix of the prompt (its prefix cache likely still holds it) unless that engine is busier than the
least-loaded one by more than `balance_slack` requests, and otherwise picks the least-loaded one (round robin on
ties). Load is the requests this gateway has in flight there plus what other gateways put there (GetStats).

Health: every `health_interval` seconds each engine gets a grpc.health.v1 Check and a GetStats; a failed check, or
a request that found the engine UNAVAILABLE, takes it out of rotation until a check passes again. When no engine
is healthy the router still tries them all, so the caller gets the real error.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.logs import kv
from common.security import TlsFiles, aio_channel
from gateway.channels import CHANNEL_OPTIONS
from gateway.decode import SharedDecode
from gateway.errors import GatewayError
from splitserve.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("splitserve.gateway.router")

ENGINE_SERVICE = "splitserve.v1.Engine"
DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class RouterSettings:
    health_interval: float = 1.0       # seconds between health checks (and DNS re-resolution)
    balance_slack: int = 16            # a prefix match wins while its engine has at most this many more requests
    block_size: int = 16               # prompt tokens per hashed block
    min_prefix_ratio: float = 0.5      # a match must cover at least this share of the prompt to win
    prefix_capacity: int = 200_000     # blocks remembered (LRU)

    def __post_init__(self) -> None:
        if self.health_interval <= 0 or self.balance_slack < 0 or self.block_size < 1:
            raise ValueError("health_interval must be positive, balance_slack >= 0, block_size >= 1")


def parse_targets(text: str) -> list[str]:
    """`a:1, b:2` -> ['a:1', 'b:2']; each is `host:port` or `dns:///name:port`."""
    targets = [part.strip() for part in text.split(",") if part.strip()]
    if not targets:
        raise ValueError("engine_address names no engine")
    for target in targets:
        host, sep, port = target.removeprefix(DNS_SCHEME).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"engine address {target!r} is not host:port or dns:///name:port")
    return targets


async def resolve(target: str) -> list[str]:
    """A `dns:///name:port` target -> one `ip:port` per address; any other target is returned as it is."""
    if not target.startswith(DNS_SCHEME):
        return [target]
    host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    addresses = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in addresses:
            addresses.append(address)
    return addresses


class PrefixMap:
    """Which engines served which prompt prefixes: a hash chain over full token blocks -> engine addresses (LRU).

    Approximate by design: it remembers what the gateway sent, not what each engine still caches.
    """

    def __init__(self, block_size: int, capacity: int) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._engines: OrderedDict[int, set[str]] = OrderedDict()

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        chain, previous = [], 0
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            previous = hash((previous, tuple(token_ids[start:start + self.block_size])))
            chain.append(previous)
        return chain

    def matched_blocks(self, hashes: list[int], address: str) -> int:
        matched = 0
        for block_hash in hashes:
            engines = self._engines.get(block_hash)
            if engines is None or address not in engines:
                break
            matched += 1
        return matched

    def record(self, hashes: list[int], address: str) -> None:
        for block_hash in hashes:
            engines = self._engines.get(block_hash)
            if engines is None:
                self._engines[block_hash] = {address}
            else:
                engines.add(address)
                self._engines.move_to_end(block_hash)
        while len(self._engines) > self.capacity:
            self._engines.popitem(last=False)

    def forget(self, address: str) -> None:
        """An engine that went away lost its cache."""
        for block_hash in [h for h, engines in self._engines.items() if address in engines]:
            engines = self._engines[block_hash]
            engines.discard(address)
            if not engines:
                del self._engines[block_hash]


class EngineEndpoint:
    """One engine: its channel and stubs, whether it is healthy, and how busy it is."""

    def __init__(self, address: str, tls: TlsFiles | None = None) -> None:
        self.address = address
        self.channel = aio_channel(address, tls, CHANNEL_OPTIONS)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.decode = SharedDecode(self.stub, address)   # the Decode stream of all requests on it
        self.healthy = True          # until a check or a request says otherwise
        self.passed_check = False    # its last health check answered SERVING (readiness counts these)
        self.in_flight = 0           # this gateway's requests on it
        self.external_load = 0       # other gateways' sequences on it, as of the last GetStats
        self.retired = False         # no longer in DNS: drained, then closed

    @property
    def load(self) -> int:
        return self.in_flight + self.external_load

    async def close(self) -> None:
        self.decode.close()
        await self.channel.close()

    def __repr__(self) -> str:
        return f"EngineEndpoint({self.address!r}, healthy={self.healthy}, load={self.load})"


class EngineRouter:
    def __init__(self, engine_address: str, settings: RouterSettings = RouterSettings(),
                 tls: TlsFiles | None = None) -> None:
        self.targets = parse_targets(engine_address)
        self.settings = settings
        self.tls = tls
        self.prefix = PrefixMap(settings.block_size, settings.prefix_capacity)
        self.endpoints: dict[str, EngineEndpoint] = {}
        self._round_robin = 0
        self._watcher: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()

    @property
    def address(self) -> str:
        return ",".join(self.targets)

    async def start(self) -> None:
        """Resolves the targets and starts the health watcher (once; every call path awaits this first)."""
        if self._watcher is not None:
            return
        async with self._started:
            if self._watcher is None:
                await self._resolve()
                self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for endpoint in self.endpoints.values():
            await endpoint.close()

    def candidates(self, exclude: Sequence[str] = ()) -> list[EngineEndpoint]:
        """Healthy engines not yet tried; when none is healthy, every engine not yet tried."""
        usable = [e for e in self.endpoints.values() if not e.retired and e.address not in exclude]
        return [e for e in usable if e.healthy] or usable

    def serving_engines(self) -> int:
        """Engines whose last health check passed (none before the first round)."""
        return sum(1 for e in self.endpoints.values() if not e.retired and e.passed_check)

    async def pick(self, prompt_ids: Sequence[int], exclude: Sequence[str] = ()) -> EngineEndpoint:
        """Chooses an engine and counts the request on it; the caller must `release` it when the request ends."""
        await self.start()
        candidates = self.candidates(exclude)
        if not candidates:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"no engine to send the request to ({self.address})")
        hashes = self.prefix.hashes(prompt_ids)
        least = min(e.load for e in candidates)
        best, best_blocks = None, 0
        for endpoint in candidates:
            blocks = self.prefix.matched_blocks(hashes, endpoint.address)
            if blocks > best_blocks or (blocks and blocks == best_blocks and endpoint.load < best.load):
                best, best_blocks = endpoint, blocks
        covers = best_blocks * self.settings.block_size >= self.settings.min_prefix_ratio * len(prompt_ids)
        if best is not None and covers and best.load <= least + self.settings.balance_slack:
            chosen = best
        else:
            lowest = [e for e in candidates if e.load == least]
            chosen = lowest[self._round_robin % len(lowest)]
            self._round_robin += 1
        self.prefix.record(hashes, chosen.address)
        chosen.in_flight += 1
        return chosen

    def release(self, endpoint: EngineEndpoint) -> None:
        endpoint.in_flight -= 1

    def mark_unavailable(self, endpoint: EngineEndpoint, reason: str) -> None:
        """A request found the engine unreachable: out of rotation until a health check passes."""
        if endpoint.healthy:
            log.warning("engine out of rotation %s", kv(engine=endpoint.address, reason=reason))
        endpoint.healthy = False
        self.prefix.forget(endpoint.address)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self._resolve()
                await asyncio.gather(*(self._check(e) for e in list(self.endpoints.values())))
                await self._close_drained()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching whatever one round met
                log.exception("engine health round failed")

    async def _check(self, endpoint: EngineEndpoint) -> None:
        timeout = max(0.5, self.settings.health_interval)
        try:
            reply = await endpoint.health.Check(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE),
                                                timeout=timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            reason = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            if serving:
                in_flight = endpoint.in_flight
                stats = await endpoint.stub.GetStats(engine_pb2.GetStatsRequest(), timeout=timeout)
                endpoint.external_load = max(0, stats.running + stats.waiting - in_flight)
        except grpc.aio.AioRpcError as exc:
            serving, reason = False, exc.code().name
        endpoint.passed_check = serving
        if serving and not endpoint.healthy:
            log.info("engine back in rotation %s", kv(engine=endpoint.address))
        elif not serving:
            self.mark_unavailable(endpoint, f"health check: {reason}")
        endpoint.healthy = serving

    async def _resolve(self) -> None:
        addresses: list[str] = []
        for target in self.targets:
            try:
                addresses.extend(a for a in await resolve(target) if a not in addresses)
            except OSError as exc:  # keep what the name resolved to last time
                log.warning("cannot resolve %s", kv(target=target, error=str(exc)))
                addresses.extend(a for a, e in self.endpoints.items() if not e.retired and a not in addresses)
        for address in addresses:
            endpoint = self.endpoints.get(address)
            if endpoint is None:
                self.endpoints[address] = EngineEndpoint(address, self.tls)
                if self._watcher is not None:
                    log.info("engine added %s", kv(engine=address))
            elif endpoint.retired:
                endpoint.retired = False
        for address, endpoint in self.endpoints.items():
            if address not in addresses and not endpoint.retired:
                log.info("engine removed %s", kv(engine=address))
                endpoint.retired = True
                self.prefix.forget(address)

    async def _close_drained(self) -> None:
        for address, endpoint in list(self.endpoints.items()):
            if endpoint.retired and endpoint.in_flight == 0:
                del self.endpoints[address]
                await endpoint.close()
