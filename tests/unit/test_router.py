"""The gateway's engine router without servers: targets, the prefix map and the choice of engine."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.router import EngineRouter, PrefixMap, RouterSettings, parse_targets, resolve

A, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
QUIET = RouterSettings(health_interval=3600)   # no health round during a test


def with_router(addresses: str, check, settings: RouterSettings = QUIET) -> None:
    async def main() -> None:
        router = EngineRouter(addresses, settings)
        await router.start()
        try:
            await check(router)
        finally:
            await router.close()
    asyncio.run(main())


def test_targets_are_a_list_of_host_port_or_dns_names():
    assert parse_targets("a:1") == ["a:1"]
    assert parse_targets(" a:1, b:2 ,dns:///engine:50053") == ["a:1", "b:2", "dns:///engine:50053"]
    for bad in ("", "a", "a:b", "dns:///engine", ":1"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_dns_targets_resolve_to_one_address_each():
    assert asyncio.run(resolve("dns:///localhost:50053")) == ["127.0.0.1:50053"]
    assert asyncio.run(resolve("engine-7:7")) == ["engine-7:7"]     # not a DNS target: taken as it is


def test_prefix_map_matches_whole_blocks_of_a_shared_prefix_only():
    prefix = PrefixMap(block_size=4, capacity=100)
    shared = list(range(10))
    first, second = prefix.hashes(shared + [50, 51]), prefix.hashes(shared + [60, 61])
    assert len(first) == 3 and first[:2] == second[:2] and first[2] != second[2]
    assert prefix.hashes([1, 2, 3]) == []                       # no whole block
    assert prefix.hashes([9, 1, 2, 3])[0] != prefix.hashes([1, 2, 3, 9])[0]
    prefix.record(first, A)
    assert prefix.matched_blocks(second, A) == 2
    assert prefix.matched_blocks(second, B) == 0
    assert prefix.matched_blocks(prefix.hashes([99] + shared), A) == 0   # same tokens, shifted: no match
    prefix.forget(A)
    assert prefix.matched_blocks(first, A) == 0


def test_prefix_map_forgets_the_least_recently_used_blocks():
    prefix = PrefixMap(block_size=1, capacity=3)
    prefix.record(prefix.hashes([1, 2, 3]), A)
    prefix.record(prefix.hashes([7]), B)
    assert prefix.matched_blocks(prefix.hashes([1, 2, 3]), A) == 0      # its first block was evicted
    assert prefix.matched_blocks(prefix.hashes([7]), B) == 1


def test_least_loaded_with_round_robin_on_ties():
    async def check(router: EngineRouter) -> None:
        picks = [(await router.pick([i])).address for i in range(4)]
        assert sorted(picks) == [A, A, B, B]           # loads stay even
        router.release(router.endpoints[A])
        router.release(router.endpoints[A])
        assert (await router.pick([9])).address == A   # A: 0 in flight, B: 2
        for endpoint in router.endpoints.values():
            endpoint.in_flight = 0
        assert {(await router.pick([])).address for _ in range(2)} == {A, B}   # ties alternate
    with_router(f"{A},{B}", check)


def test_the_engine_holding_the_prefix_wins_within_the_balance_slack():
    prompt = list(range(64))

    async def check(router: EngineRouter) -> None:
        home = await router.pick(prompt)
        other = router.endpoints[B if home.address == A else A]
        for i in range(3):   # home is busier, but within the slack of 3
            assert await router.pick(prompt + [i]) is home
        assert home.load == 4 and other.load == 0
        assert await router.pick(prompt + [9]) is other   # now 4 more than the least loaded: balance wins
        assert await router.pick(list(range(100, 164))) is other   # no match: least loaded
    with_router(f"{A},{B}", check, RouterSettings(health_interval=3600, balance_slack=3))


def test_a_short_match_does_not_outweigh_the_load():
    async def check(router: EngineRouter) -> None:
        home = await router.pick(list(range(16)))
        other = router.endpoints[B if home.address == A else A]
        # 16 of 64 tokens shared: under min_prefix_ratio, so the least-loaded engine gets it.
        assert await router.pick(list(range(16)) + list(range(100, 148))) is other
    with_router(f"{A},{B}", check)


def test_unhealthy_engines_get_nothing_until_none_is_left():
    async def check(router: EngineRouter) -> None:
        router.mark_unavailable(router.endpoints[A], "test")
        assert {(await router.pick([i])).address for i in range(4)} == {B, C}
        assert (await router.pick([1], exclude=[B])).address == C
        router.mark_unavailable(router.endpoints[B], "test")
        router.mark_unavailable(router.endpoints[C], "test")
        # None healthy: try them anyway (the call then says what is wrong) ...
        assert (await router.pick([1], exclude=[A, B])).address == C
        # ... but never one already tried.
        with pytest.raises(GatewayError) as info:
            await router.pick([1], exclude=[A, B, C])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with_router(f"{A},{B},{C}", check)


def test_a_failed_health_check_takes_an_engine_out_and_forgets_its_prefixes():
    async def check(router: EngineRouter) -> None:
        endpoint = router.endpoints[A]
        await router.pick(list(range(32)))
        assert router.prefix.matched_blocks(router.prefix.hashes(list(range(32))), A) == 2
        await router._check(endpoint)          # nothing listens on port 1
        assert not endpoint.healthy
        assert router.prefix.matched_blocks(router.prefix.hashes(list(range(32))), A) == 0
    with_router(A, check, RouterSettings(health_interval=0.5))
