"""The OpenAI-compatible HTTP API, driven by the official `openai` SDK against the real gateway on the tiny model:
the same pipeline as the gRPC API, so greedy answers match the gRPC ones token for token."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.helpers import make_request, prompt_ids, reference_greedy, stream
from tests.integration.test_lifecycle import scrape, wait_until
from splitserve.v1 import engine_pb2

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours. 你好 🙂"}]


@pytest.fixture(scope="module")
def client(tiny_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{tiny_stack.ports.gateway_http}/v1", api_key="unused",
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def post(tiny_stack, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    """A raw POST (for what the SDK would not send); returns the status and the JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{tiny_stack.ports.gateway_http}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat_tuples(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def test_models_lists_the_served_model(client, tiny_stack):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id and models[0].id == models[0].root   # the engine's model name (the folder's name here)
    assert models[0].max_model_len == 2048
    assert models[0].owned_by == "splitserve"


def test_greedy_completion_streamed_equals_whole_equals_grpc_and_transformers(client, model, gateway, tiny_model,
                                                                              tokenizer):
    ids = prompt_ids(tokenizer, PROMPT)
    expected_ids = reference_greedy(tiny_model, ids, 16)
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    parts, usage, finish = [], None, None
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    grpc_reply = stream(gateway, make_request(PROMPT, max_tokens=16, temperature=0.0))
    assert whole.choices[0].text == "".join(parts) == grpc_reply.text == tokenizer.decode(expected_ids,
                                                                                           skip_special_tokens=True)
    assert whole.object == "text_completion" and whole.model == model
    assert whole.choices[0].finish_reason == finish == grpc_reply.last.finish_reason
    assert whole.usage.prompt_tokens == usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == usage.completion_tokens == len(expected_ids)
    assert whole.usage.total_tokens == usage.total_tokens == len(ids) + len(expected_ids)


def test_greedy_chat_streamed_equals_whole_equals_grpc(client, model, gateway, tokenizer, tiny_model):
    ids = prompt_ids(tokenizer, chat_tuples(CHAT))
    expected_ids = reference_greedy(tiny_model, ids, 20)
    whole = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    grpc_reply = stream(gateway, make_request(chat_tuples(CHAT), max_tokens=20, temperature=0.0))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == grpc_reply.text
    assert grpc_reply.token_ids == expected_ids
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    assert whole.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(expected_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_seed_top_p_and_max_tokens(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert free.usage.completion_tokens == 24 and free.choices[0].finish_reason == "length"
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for stops in (stop, [stop, "never-seen-stop"]):
        stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[: text.index(stop)]
    # seed: the same seed samples the same text; another seed another text.
    sampled = [client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] != text[: len(sampled[0])]
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    nucleus = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=1e-6,
                                        seed=3, extra_body={"ignore_eos": True})
    assert nucleus.choices[0].text == text


def test_unset_temperature_is_openais_default_of_one(client, model):
    def complete(**extra) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, seed=11,
                                         extra_body={"ignore_eos": True}, **extra).choices[0].text

    assert complete() == complete(temperature=1.0) != complete(temperature=0)


def test_vllm_extras_and_penalties_behave_as_on_grpc(client, model, gateway):
    cases = [dict(top_k=1, temperature=1.0, seed=5), dict(repetition_penalty=1.3, temperature=0.0),
             dict(presence_penalty=1.5, frequency_penalty=0.5, temperature=0.0),
             dict(min_p=0.2, temperature=0.7, seed=9)]
    for sampling in cases:
        http_sampling = dict(sampling)
        extra = {k: http_sampling.pop(k) for k in ("top_k", "repetition_penalty", "min_p") if k in http_sampling}
        http = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True,
                                                                                                  **extra},
                                         **http_sampling)
        rpc = stream(gateway, make_request(PROMPT, max_tokens=12, ignore_eos=True, **sampling))
        assert http.choices[0].text == rpc.text, sampling
    first_token = stream(gateway, make_request(PROMPT, max_tokens=8, temperature=0.0)).token_ids[3]
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [first_token]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 4


def test_n_above_sixteen_is_refused_clearly(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=17)
    assert info.value.status_code == 400
    assert "sampling.n must be in [0, 16]" in info.value.message
    assert info.value.body["code"] == "invalid_argument"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=2, temperature=0)
    assert "n > 1 needs sampling" in info.value.message


def test_n_choices_whole_and_streamed(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, seed=4,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in whole.choices)
    assert len({c.text for c in whole.choices}) == 3
    assert whole.usage.completion_tokens == 3 * 8 and whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, seed=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {c.index: c.text for c in whole.choices}      # same seeds, same completions
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_n_chat_stream_announces_the_role_once_per_choice(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, n=2, temperature=0.8,
                                                 seed=2, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, n=2, temperature=0.8, seed=2)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == choice.index)
        assert streamed == choice.message.content


def visible_bytes(entries, tokenizer) -> str:
    """The text behind logprob entries: their bytes, without special tokens (which decode skips)."""
    special = {token.content for token in tokenizer.added_tokens_decoder.values()}
    return b"".join(bytes(e.bytes) for e in entries if e.token not in special).decode("utf-8", "replace")


def test_chat_logprobs_and_top_logprobs(client, model, tokenizer):
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                           top_logprobs=3, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 10
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert entry.bytes and all(t.bytes for t in entry.top_logprobs)
    assert visible_bytes(content, tokenizer) == whole.choices[0].message.content
    streamed = [entry for chunk in client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0)
    assert none.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_format(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob and max(top.values()) == logprob     # greedy: the chosen is the most likely
        assert 1 <= len(top) <= 3
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    streamed = [t for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                         logprobs=2, stream=True, extra_body={"ignore_eos": True})
                if chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def test_chat_top_logprobs_needs_logprobs(tiny_stack):
    status, reply = post(tiny_stack, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "top_logprobs": 2})
    assert status == 400 and reply["error"]["param"] == "top_logprobs"


def test_logit_bias_with_string_keys_and_extension_fields_are_accepted(client, model):
    biased = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"50": 0.0, "7": -1.5})
    assert biased.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body={"num_beams": 2,
                                                                                         "temperature": 0.5})
    assert "num_beams" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body={"speculative": "medusa"})
    assert "speculative" in info.value.message


@pytest.mark.parametrize("body,status,param,words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b'{"prompt": "\xff\xfe bad utf-8", "max_tokens": 3}', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({"prompt": "hi", "max_tokens": "three"}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens", "between"),
    ({"prompt": "hi", "max_tokens": -1}, 400, None, "max_tokens must be at least 1"),
    ({"prompt": "hi", "temperature": True}, 400, "temperature", "must be a number"),
    ({"prompt": "hi", "temperature": 1e300}, 400, None, "finite"),
    ({"prompt": "hi", "stop": 5}, 400, "stop", "string or an array"),
    ({"prompt": "\ud800 lone surrogate"}, 400, "prompt", "lone surrogate"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "token-id prompts are not supported"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, None, "does not exist"),
    ({"prompt": "hi", "max_tokens": 4096}, 400, None, "context"),
])
def test_bad_completions_get_openai_error_bodies(tiny_stack, body, status, param, words):
    got_status, reply = post(tiny_stack, "/v1/completions", body)
    assert got_status == status, reply
    error = reply["error"]
    assert words in error["message"] and error["param"] == param
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert error["code"] == ("invalid_argument" if status == 400 else "not_found")
    ok_status, ok = post(tiny_stack, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok_status == 200 and ok["usage"]["completion_tokens"] >= 1


def test_bad_chat_messages_are_400(tiny_stack):
    for messages, words in [([], "non-empty array"), ([{"role": "wizard", "content": "hi"}], "role"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "text part"),
                            (["hello"], "must be an object")]:
        status, reply = post(tiny_stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert status == 400 and words in reply["error"]["message"], reply


def test_text_parts_and_developer_role_are_accepted(client, model, gateway):
    parts = client.chat.completions.create(
        model=model, max_tokens=6, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    rpc = stream(gateway, make_request([("system", "Be brief."), ("user", "Hello there")], max_tokens=6,
                                       temperature=0.0))
    assert parts.choices[0].message.content == rpc.text


def test_unknown_route_is_a_json_404(tiny_stack):
    status, reply = post(tiny_stack, "/v1/embeddings", {"input": "x"})
    assert status == 404 and reply["error"]["code"] == "not_found"


def test_health_and_metrics_on_the_http_port(tiny_stack, client, model):
    with urllib.request.urlopen(f"http://127.0.0.1:{tiny_stack.ports.gateway_http}/health", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
    before = scrape(tiny_stack.ports.gateway_http)
    client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0)
    after = scrape(tiny_stack.ports.gateway_http)
    served = sum(v for k, v in after.items() if k.startswith("splitserve_requests_total{"))
    assert served == sum(v for k, v in before.items() if k.startswith("splitserve_requests_total{")) + 1
    count = "splitserve_e2e_request_latency_seconds_count"
    assert after[count] == before[count] + 1
    # the same registry as the metrics port
    assert scrape(tiny_stack.ports.gateway_metrics)[count] == after[count]


def test_a_client_that_drops_an_sse_stream_frees_the_engine(client, model, engine, tiny_stack):
    """Freed because the client left (an abort), not because the 1,900 tokens ran out: no bound on speed."""
    before = engine.GetStats(engine_pb2.GetStatsRequest())
    aborted = 'splitserve_engine_requests_finished_total{finish_reason="abort"}'
    aborted_before = scrape(tiny_stack.ports.engine_metrics).get(aborted, 0.0)
    chunks = client.completions.create(model=model, prompt="a very long story:", max_tokens=1900, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(chunks))
    assert engine.GetStats(engine_pb2.GetStatsRequest()).running == 1
    chunks.close()
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == 0, timeout=60)
    assert engine.GetStats(engine_pb2.GetStatsRequest()).kv_blocks_used == before.kv_blocks_used
    assert scrape(tiny_stack.ports.engine_metrics)[aborted] == aborted_before + 1


def test_a_vanishing_temperature_is_greedy(client, model):
    """As in vLLM, temperatures below 1e-5 are greedy (a denormal one once overflowed the engine's logits)."""
    texts = {t: client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=t,
                                          extra_body={"ignore_eos": True}).choices[0].text for t in (0, 1e-40, 3e-6)}
    assert texts[0] == texts[1e-40] == texts[3e-6]
