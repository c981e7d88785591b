"""Admission control counts engine sequences: a request with n completions holds n slots, taken together."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.admission import Admission
from gateway.client_limit import ClientLimit, client_of, host_of
from gateway.errors import GatewayError


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_request_with_n_completions_holds_n_slots():
    async def scenario():
        admission = Admission(max_running=4, max_waiting=4)
        order: list[str] = []
        release_big = asyncio.Event()

        async def hold(name: str, weight: int, until: asyncio.Event | None = None) -> None:
            async with admission.slot(None, weight=weight):
                order.append(name)
                if until is not None:
                    await until.wait()

        big = asyncio.create_task(hold("big", 3, release_big))
        await asyncio.sleep(0)
        assert admission.running == 3
        two = asyncio.create_task(hold("two", 2))      # does not fit next to the 3: waits
        one = asyncio.create_task(hold("one", 1))      # would fit, but waits its turn behind "two"
        await asyncio.sleep(0)
        assert order == ["big"] and admission.waiting == 2
        release_big.set()
        await asyncio.gather(big, two, one)
        assert order == ["big", "two", "one"] and admission.running == 0

    run(scenario())


def test_more_completions_than_slots_still_run_alone():
    async def scenario():
        admission = Admission(max_running=2, max_waiting=0)
        async with admission.slot(None, weight=16):
            assert admission.running == 2
            with pytest.raises(GatewayError) as info:
                async with admission.slot(None, weight=1):
                    pass
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert admission.running == 0

    run(scenario())


def test_a_large_waiter_that_times_out_lets_the_smaller_ones_behind_it_in():
    async def scenario():
        admission = Admission(max_running=3, max_waiting=4)
        held = asyncio.Event()

        async def hold() -> None:
            async with admission.slot(None, weight=2):
                await held.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)

        async def big() -> None:
            async with admission.slot(time.monotonic() + 0.05, weight=3):
                pass

        big_task = asyncio.create_task(big())
        await asyncio.sleep(0)
        small_done = asyncio.Event()

        async def small() -> None:
            async with admission.slot(None, weight=1):
                small_done.set()

        small_task = asyncio.create_task(small())
        await asyncio.sleep(0)
        assert not small_done.is_set()           # behind the big one
        with pytest.raises(GatewayError) as info:
            await big_task
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(small_task, 1)    # the big one left: the small one fits next to the holder
        held.set()
        await holder
        assert admission.running == 0 and admission.waiting == 0

    run(scenario())


def test_a_client_is_its_key_when_keys_are_required_else_its_host():
    assert host_of("ipv4:10.1.2.3:5678") == "10.1.2.3" and host_of("ipv6:[::1]:5678") == "::1"
    assert host_of("10.1.2.3") == "10.1.2.3" and host_of("") == "unknown"
    # the same machine on two connections is one client; the key, when required, wins over the address
    assert client_of(None, "ipv4:10.1.2.3:1", keyed=False) == client_of(None, "ipv4:10.1.2.3:2", keyed=False)
    a = client_of("Bearer sk-a", "ipv4:10.1.2.3:1", keyed=True)
    assert a == client_of("bearer sk-a", "10.9.9.9", keyed=True) != client_of("Bearer sk-b", "ipv4:10.1.2.3:1", True)
    assert a.startswith("key:") and "sk-a" not in a          # a digest, never the key
    assert client_of("Bearer sk-a", "10.1.2.3", keyed=False) == "addr:10.1.2.3"


def test_the_per_client_cap_refuses_the_extra_request_and_gives_the_slot_back():
    limit = ClientLimit(2)
    with limit.hold("a"), limit.hold("a"):
        with pytest.raises(GatewayError) as info, limit.hold("a"):
            pass
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with limit.hold("b"):
            assert limit.open == {"a": 2, "b": 1}
    assert not limit.open
    with limit.hold("a"):
        pass
    unlimited = ClientLimit(0)
    with unlimited.hold("a"), unlimited.hold("a"), unlimited.hold("a"):
        assert not unlimited.open
