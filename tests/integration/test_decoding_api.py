"""The decoding-strategy fields through the real stack on the tiny model: every invalid combination is refused
(INVALID_ARGUMENT / HTTP 400, naming the field); n completions fan out, merge, finish each with usage and leave
nothing behind in the engine; logprobs are the model's own, aligned with the tokens, with their texts."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch

from tests.helpers import make_request, prompt_ids, rpc_error, start_extra_gateway, stream
from tests.integration.test_lifecycle import scrape, wait_until
from tests.unit.test_validation import INVALID_DECODING
from splitserve.v1 import engine_pb2, gateway_pb2_grpc
from tokenizer_service.token_bytes import TokenTexts

PROMPT = "Once upon a time, in a land far away,"


def engine_idle(engine, kv_blocks_used: int, timeout: float = 10.0) -> bool:
    def idle() -> bool:
        stats = engine.GetStats(engine_pb2.GetStatsRequest())
        return stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == kv_blocks_used
    return wait_until(idle, timeout)


def by_index(chunks) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for chunk in chunks:
        grouped.setdefault(chunk.index, []).append(chunk)
    return grouped


# ---- invalid combinations, on both front doors -------------------------------------------------------------------

@pytest.mark.parametrize("case", list(INVALID_DECODING))
def test_invalid_decoding_parameters_are_invalid_argument(gateway, case):
    params, words = INVALID_DECODING[case]
    error = rpc_error(lambda: gateway.Generate(make_request("hello", max_tokens=4, **params), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details()


def http_body(params: dict) -> dict:
    """The same parameters as an OpenAI completions body (logit_bias keys are strings; temperature explicit)."""
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0.0, **params}
    if "logit_bias" in body:
        body["logit_bias"] = {str(k): v if v == v else "NaN" for k, v in body["logit_bias"].items()}
    return body


def post(stack, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).replace('"NaN"', "NaN").encode()
    request = urllib.request.Request(f"http://127.0.0.1:{stack.ports.gateway_http}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("case", list(INVALID_DECODING))
def test_invalid_decoding_parameters_are_http_400(tiny_stack, case):
    params, words = INVALID_DECODING[case]
    status, reply = post(tiny_stack, "/v1/completions", http_body(params))
    assert status == 400, reply
    assert words in reply["error"]["message"] and reply["error"]["code"] == "invalid_argument"


def test_logit_bias_past_the_vocabulary_is_refused(gateway, tiny_stack):
    error = rpc_error(lambda: gateway.Generate(make_request("hello", max_tokens=4, logit_bias={10**6: 1.0}),
                                               timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in error.details()
    status, reply = post(tiny_stack, "/v1/completions", http_body({"logit_bias": {"abc": 1}}))
    assert status == 400 and reply["error"]["param"] == "logit_bias"


# ---- n completions ------------------------------------------------------------------------------------------------

def test_n_completions_each_finish_with_usage_and_free_the_engine(gateway, engine, tokenizer):
    baseline = engine.GetStats(engine_pb2.GetStatsRequest()).kv_blocks_used
    ids = prompt_ids(tokenizer, PROMPT)
    request = make_request(PROMPT, max_tokens=12, temperature=1.0, seed=5, n=3, ignore_eos=True)
    got = stream(gateway, request)
    completions = by_index(got.chunks)
    assert sorted(completions) == [0, 1, 2]
    for chunks in completions.values():
        assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
        last = chunks[-1]
        assert last.finish_reason == "length"
        assert last.usage.prompt_tokens == len(ids)
        assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks) == 12
        assert all(not c.HasField("usage") for c in chunks[:-1])
    texts = {i: "".join(c.text for c in chunks) for i, chunks in completions.items()}
    assert len(set(texts.values())) == 3, texts           # seed + i: the completions differ
    again = by_index(stream(gateway, request).chunks)      # ... and are reproducible
    assert {i: "".join(c.text for c in chunks) for i, chunks in again.items()} == texts
    single = stream(gateway, make_request(PROMPT, max_tokens=12, temperature=1.0, seed=6, ignore_eos=True))
    assert single.text == texts[1]                         # completion 1 samples with seed 5 + 1
    assert engine_idle(engine, baseline)


def test_n_completions_compute_the_prompt_once(gateway, tiny_stack, tokenizer):
    """The other completions take the prompt's full blocks from the engine's prefix cache."""
    prompt = "A fresh prompt that no other test sends, long enough to fill a few cache blocks: " * 3
    full_blocks = len(prompt_ids(tokenizer, prompt)) // 16 * 16      # the tiny stack's block size
    hits = "splitserve_engine_prefix_cache_hits_total"
    before = scrape(tiny_stack.ports.engine_metrics)[hits]
    got = stream(gateway, make_request(prompt, max_tokens=4, temperature=1.0, n=4, ignore_eos=True))
    assert sorted(by_index(got.chunks)) == [0, 1, 2, 3]
    assert scrape(tiny_stack.ports.engine_metrics)[hits] - before >= 3 * full_blocks > 0


def test_n_completions_apply_stop_strings_each(gateway):
    free = by_index(stream(gateway, make_request(PROMPT, max_tokens=16, temperature=1.0, seed=9, n=2,
                                                 ignore_eos=True)).chunks)
    text0 = "".join(c.text for c in free[0])
    stop = text0[6:9]
    stopped = by_index(stream(gateway, make_request(PROMPT, max_tokens=16, temperature=1.0, seed=9, n=2,
                                                    ignore_eos=True, stop=[stop])).chunks)
    assert "".join(c.text for c in stopped[0]) == text0[:text0.index(stop)]
    assert stopped[0][-1].finish_reason == "stop"
    text1 = "".join(c.text for c in free[1])
    expected1 = text1[:text1.index(stop)] if stop in text1 else text1
    assert "".join(c.text for c in stopped[1]) == expected1


def test_cancelling_an_n_request_mid_stream_aborts_all_its_sequences(gateway, engine):
    baseline = engine.GetStats(engine_pb2.GetStatsRequest()).kv_blocks_used
    call = gateway.Generate(make_request("a very long story:", max_tokens=1900, temperature=1.0, n=3,
                                         ignore_eos=True), timeout=120)
    seen = set()
    for chunk in call:
        seen.add(chunk.index)
        if len(seen) == 3:
            break
    assert engine.GetStats(engine_pb2.GetStatsRequest()).running == 3
    call.cancel()
    assert engine_idle(engine, baseline), engine.GetStats(engine_pb2.GetStatsRequest())


def test_a_deadline_ends_every_completion(gateway, engine):
    baseline = engine.GetStats(engine_pb2.GetStatsRequest()).kv_blocks_used
    error = rpc_error(lambda: gateway.Generate(make_request("a very long story:", max_tokens=1900, temperature=1.0,
                                                            n=3, ignore_eos=True), timeout=1.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert engine_idle(engine, baseline), engine.GetStats(engine_pb2.GetStatsRequest())


# ---- logprobs -----------------------------------------------------------------------------------------------------

def test_greedy_logprobs_are_the_models_own(gateway, tiny_model, tokenizer):
    got = stream(gateway, make_request(PROMPT, max_tokens=10, temperature=0.0, logprobs=5, ignore_eos=True))
    ids = prompt_ids(tokenizer, PROMPT)
    for chunk in got.chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
    entries = [lp for chunk in got.chunks for lp in chunk.logprobs]
    assert len(entries) == len(got.token_ids) == 10
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([ids + got.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(ids) - 1: -1], dim=-1)
    texts = TokenTexts(tokenizer.backend_tokenizer)
    for position, lp in enumerate(entries):
        assert len(lp.top) == 5
        assert lp.top[0].token_id == lp.token_id and lp.top[0].token == lp.token   # greedy: the most likely
        values = [top.logprob for top in lp.top]
        assert all(v <= 0 for v in values) and values == sorted(values, reverse=True)
        assert lp.logprob == pytest.approx(float(reference[position, lp.token_id]), abs=1e-4)
        expected_top = torch.topk(reference[position], 5)
        assert [top.logprob for top in lp.top] == pytest.approx(expected_top.values.tolist(), abs=1e-4)
        assert lp.token == texts.lookup([lp.token_id])[0].text
        assert [top.token for top in lp.top] == [t.text for t in texts.lookup([top.token_id for top in lp.top])]


def test_logprobs_stay_aligned_when_a_stop_string_cuts_the_stream(gateway):
    free = stream(gateway, make_request(PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True))
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]
    got = stream(gateway, make_request(PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0,
                                       stop=[stop]))
    assert got.last.finish_reason == "stop" and got.text == free.text[:free.text.index(stop)]
    for chunk in got.chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
        assert all(not lp.top for lp in chunk.logprobs)
    assert got.token_ids == free.token_ids[:len(got.token_ids)]
    assert got.last.usage.completion_tokens == len(got.token_ids)


def test_no_logprobs_unless_asked(gateway):
    got = stream(gateway, make_request(PROMPT, max_tokens=4, temperature=0.0))
    assert all(not chunk.logprobs for chunk in got.chunks)


def test_sampled_n_with_logprobs(gateway):
    got = stream(gateway, make_request(PROMPT, max_tokens=6, temperature=0.9, seed=1, n=2, logprobs=2,
                                       ignore_eos=True))
    for chunk in got.chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
        assert all(len(lp.top) == 2 and lp.logprob <= lp.top[0].logprob + 1e-6 for lp in chunk.logprobs)
    assert sorted(by_index(got.chunks)) == [0, 1]


def test_an_n_request_holds_n_admission_slots(tiny_stack, tmp_path_factory, engine):
    """A gateway with 2 slots: an n=2 request takes both; the next request waits until it ends."""
    extra = start_extra_gateway(tiny_stack, tmp_path_factory.mktemp("admission-gateway"),
                                ["--max-concurrent-requests", "2"])
    try:
        with grpc.insecure_channel(extra.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Generate(make_request("a long story:", max_tokens=1900, temperature=1.0, n=2,
                                              ignore_eos=True), timeout=120)
            next(call)
            waiting = stub.Generate(make_request("hi", max_tokens=2, request_id="waits-for-a-slot"), timeout=120)
            time.sleep(0.5)
            assert engine.GetStats(engine_pb2.GetStatsRequest()).running == 2   # the third sequence waits
            call.cancel()
            assert list(waiting)[-1].finish_reason in ("stop", "length")
    finally:
        extra.stop()
