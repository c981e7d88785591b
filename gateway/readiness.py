"""The gateway's readiness: SERVING only while a request could succeed, i.e. while the tokenizer and at least one
engine answer their health checks. Load balancers and Kubernetes readiness probes read it (gRPC health, service
"" and "splitserve.v1.Gateway"; HTTP GET /health); GET /health/live says only that the process is up.

A gateway that listens before its upstreams do (containers start in any order) would otherwise take traffic that
can only fail with UNAVAILABLE."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.logs import kv
from gateway.pipeline import Pipeline

log = logging.getLogger("splitserve.gateway.readiness")


class Readiness:
    """Checks the upstreams every `interval` seconds and reports changes through `on_change(ready)`."""

    def __init__(self, pipeline: Pipeline, interval: float,
                 on_change: Callable[[bool], Awaitable[None]]) -> None:
        self.pipeline = pipeline
        self.interval = interval
        self.on_change = on_change
        self.ready = False
        self.stopped = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stops reporting (on shutdown: NOT_SERVING stays NOT_SERVING)."""
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _watch(self) -> None:
        while not self.stopped:
            try:
                tokenizer, engines = await self.pipeline.upstreams_serving(timeout=max(0.5, self.interval))
            except asyncio.CancelledError:
                raise
            except Exception:   # keep watching whatever one round met
                log.exception("readiness check failed")
                tokenizer, engines = False, 0
            ready = tokenizer and engines > 0
            if ready != self.ready and not self.stopped:
                log.info("gateway %s", kv(ready=ready, tokenizer_serving=tokenizer, engines_serving=engines))
                try:
                    await self.on_change(ready)
                    self.ready = ready
                except Exception:   # tried again next round
                    log.exception("reporting readiness failed")
            await asyncio.sleep(self.interval)
