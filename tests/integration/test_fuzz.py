"""Fuzzing both front doors with hypothesis: 500 random requests each (random strings, invalid UTF-8 and broken JSON on
HTTP, huge, negative and non-finite numbers, random field combinations). Every answer is a success or a 4xx /
INVALID_ARGUMENT with a message; no process dies, and a normal request is served afterwards.

The gateway under test caps max_tokens at 16 (--max-output-tokens) so that the valid requests stay quick.
FUZZ_SEED=<n> explores other examples (the default seed keeps CI reproducible)."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from common.chat import CHAT_ROLES
from tests.helpers import make_request, start_extra_gateway, stream
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

EXAMPLES = 500
MAX_OUTPUT = 16
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261126"))

INT32, INT64 = 2**31 - 1, 2**63 - 1
texts = st.text(max_size=40) | st.sampled_from(["", "hello", "你好 🙂", "\x00", "\ud800", "a" * 300, "</s>",
                                                "<|im_end|>", "\n\n"])
numbers = (st.integers(-5, 40) | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, INT32, INT32 + 1, INT64])
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-45, 1e-6, 0.5, 1.0, 2.0, 1e39]))
json_values = st.recursive(st.none() | st.booleans() | numbers | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=6)
SAMPLING_FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                   "ignore_eos", "n", "logprobs", "stream", "stream_options", "model", "echo", "best_of",
                   "logit_bias", "response_format", "user", "tools", "tool_choice", "guided_regex"]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}}}}]
field_values = {
    "max_tokens": st.integers(-3, MAX_OUTPUT + 2) | numbers, "max_completion_tokens": st.integers(1, 8) | numbers,
    "temperature": st.floats(0, 3) | numbers, "top_p": st.floats(0, 1) | numbers, "top_k": numbers,
    "min_p": st.floats(0, 1) | numbers, "seed": numbers, "presence_penalty": st.floats(-3, 3) | numbers,
    "frequency_penalty": st.floats(-3, 3) | numbers, "repetition_penalty": st.floats(0, 3) | numbers,
    "stop": texts | st.lists(texts, max_size=20) | json_values,
    "stop_token_ids": st.lists(st.integers(-2, 60000) | numbers, max_size=3) | json_values,
    "ignore_eos": st.booleans() | json_values, "n": st.sampled_from([1, 2, 0, -1]) | json_values,
    "logprobs": st.sampled_from([None, 0, 1, True, False]) | json_values, "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "model": st.sampled_from(["", "nope"]) | texts, "echo": st.booleans(), "best_of": st.sampled_from([1, 2]),
    "logit_bias": st.sampled_from([{}, {"50": 1}]), "response_format": st.sampled_from([{"type": "text"},
                                                                                       {"type": "json_object"}]),
    "user": texts, "tools": st.just(TOOLS) | json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}])
    | json_values, "guided_regex": st.sampled_from(["[a-z]{1,4}", "(", ""]) | json_values,
}
valid_texts = st.text(min_size=1, max_size=30)
valid_field_values = {
    "max_tokens": st.integers(1, MAX_OUTPUT), "max_completion_tokens": st.integers(1, MAX_OUTPUT),
    "temperature": st.floats(0, 2) | st.sampled_from([1e-40, 1e-30, 3e-6, 1e-5]), "top_p": st.floats(1e-6, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1), "seed": st.integers(-INT64 - 1, INT64), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.05, 3),
    "stop": valid_texts | st.lists(valid_texts, max_size=4), "stop_token_ids": st.lists(st.integers(0, 49151),
                                                                                          max_size=3),
    "ignore_eos": st.booleans(), "n": st.just(1), "logprobs": st.sampled_from([None, False]),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.just(""), "echo": st.just(False), "best_of": st.just(1), "logit_bias": st.just({}),
    "response_format": st.just({"type": "text"}), "user": texts, "tools": st.just(TOOLS),
    "tool_choice": st.sampled_from(["none", "required"]), "guided_regex": st.just("[a-z]{1,4}"),
}
valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(CHAT_ROLES), "content": st.text(max_size=30)}),
                          min_size=1, max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from([*CHAT_ROLES, "developer", "wizard", ""]) | texts,
                                           "content": texts | st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image_url"]), "text": texts}),
                                               max_size=2) | json_values}) | json_values, max_size=3)


@st.composite
def http_requests(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    kind = draw(st.sampled_from(["object"] * 8 + ["bytes", "json"]))
    if kind == "bytes":          # random bytes: broken JSON, invalid UTF-8
        return path, draw(st.binary(max_size=60) | st.just(b'{"prompt": "\xff\xfe\xc3(", "max_tokens": 2}'))
    if kind == "json":           # valid JSON that is not a request object
        return path, json.dumps(draw(json_values)).encode()
    # Half the requests are valid but for (at most) one field, so that the serving path is fuzzed too.
    valid = draw(st.booleans())
    body = {}
    if path == "/v1/completions":
        body["prompt"] = draw(valid_texts if valid else texts | st.lists(texts, max_size=2) | json_values)
    else:
        body["messages"] = draw(valid_messages if valid else messages)
    for name in draw(st.lists(st.sampled_from(SAMPLING_FIELDS), max_size=8, unique=True)):
        body[name] = draw(valid_field_values[name] if valid else field_values[name])
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(body)))
        if valid and name in field_values and draw(st.booleans()):
            body[name] = draw(field_values[name])
        else:
            body.pop(name)
    return path, json.dumps(body).encode()   # NaN and Infinity are written as such; lone surrogates as \\udxxx


@st.composite
def grpc_requests(draw) -> gateway_pb2.GenerateRequest:
    text = st.text(max_size=40)   # no lone surrogates: protobuf cannot carry them
    valid = draw(st.booleans())    # half are valid but for (at most) one field

    def pick(good: st.SearchStrategy, bad: st.SearchStrategy):
        return draw(good if valid and draw(st.integers(0, 9)) else good | bad)

    request = gateway_pb2.GenerateRequest(request_id=pick(st.just(""), st.sampled_from(["fixed-id"]) | text))
    if pick(st.booleans(), st.booleans()):
        request.prompt = pick(valid_texts, text)
    if not request.prompt or pick(st.just(False), st.booleans()):
        for _ in range(pick(st.integers(1, 3), st.integers(0, 3))):
            request.messages.append(common_pb2.ChatMessage(role=pick(st.sampled_from(CHAT_ROLES), text),
                                                           content=draw(text)))
    sampling = request.sampling
    bad_floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    tiny = st.sampled_from([1e-40, 1e-30, 3e-6, 1e-5])   # denormal float32 temperatures once failed the engine's step
    ranges = {"temperature": (0, 2), "top_p": (1e-6, 1), "min_p": (0, 1), "repetition_penalty": (0.05, 3),
              "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
    if draw(st.booleans()):
        sampling.max_tokens = pick(st.integers(1, MAX_OUTPUT), st.integers(-(2**31), INT32))
    for name, (low, high) in ranges.items():
        if draw(st.booleans()):
            setattr(sampling, name, pick(st.floats(low, high) | (tiny if name == "temperature" else st.nothing()),
                                         bad_floats))
    if draw(st.booleans()):
        sampling.top_k = pick(st.integers(0, 100), st.integers(-(2**31), INT32))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(-(2**63), INT64))
    sampling.stop.extend(pick(st.lists(valid_texts, max_size=4), st.lists(text, max_size=18)))
    sampling.stop_token_ids.extend(pick(st.lists(st.integers(0, 49151), max_size=3),
                                        st.lists(st.integers(-(2**31), INT32), max_size=3)))
    sampling.ignore_eos = draw(st.booleans())
    sampling.logprobs = pick(st.just(0), st.sampled_from([1, -1, INT32]))
    if draw(st.integers(0, 3)) == 0:   # a constraint, of random text: mostly INVALID_ARGUMENT from the engine's compile
        kind = draw(st.sampled_from(["json_schema", "regex", "grammar", "choice", "json_object"]))
        constraint = sampling.structured_output
        if kind == "choice":
            constraint.choice.choices.extend(draw(st.lists(text, max_size=3)))
        elif kind == "json_object":
            constraint.json_object = draw(st.booleans())
        else:
            setattr(constraint, kind, draw(text | st.sampled_from(['{"type": "string", "maxLength": 3}', "[a-c]{2}",
                                                                   'root ::= "x" | "y"', "a(b", "{"])))
    return request


@pytest.fixture(scope="module")
def fuzzed(tiny_stack, tmp_path_factory):
    extra = start_extra_gateway(tiny_stack, tmp_path_factory.mktemp("fuzz-gateway"),
                                ["--max-output-tokens", str(MAX_OUTPUT)])
    yield extra
    extra.stop()


def all_alive(*stacks) -> None:
    for stack in stacks:
        for name, service in stack.services.items():
            if service.process is not None:
                assert service.process.poll() is None, f"{name} died:\n{stack.log_tail(name)}"


def check_http_answer(status: int, payload: bytes, streamed: bool) -> None:
    if status != 200:
        assert status in (400, 404), (status, payload)
        error = json.loads(payload)["error"]
        assert error["message"] and error["type"] and error["code"], error
        return
    if not streamed:   # n choices (n > 1 is valid with sampling)
        body = json.loads(payload)
        assert all(choice["finish_reason"] in ("stop", "length", "tool_calls") for choice in body["choices"]), body
        assert 1 <= body["usage"]["completion_tokens"] <= MAX_OUTPUT * len(body["choices"])
        return
    events = [line[len("data: "):] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks
    reasons: dict[int, list[str]] = {}
    for choice in (c["choices"][0] for c in chunks if c["choices"]):
        reasons.setdefault(choice["index"], [])
        if choice["finish_reason"]:
            reasons[choice["index"]].append(choice["finish_reason"])
    assert reasons and all(r in (["stop"], ["length"], ["tool_calls"]) for r in reasons.values()), chunks


def test_random_http_requests_get_a_success_or_a_4xx(fuzzed, tiny_stack):
    base = f"http://127.0.0.1:{fuzzed.ports.gateway_http}"

    @seed(FUZZ_SEED)
    @FUZZ
    @given(http_requests())
    def one(request: tuple[str, bytes]) -> None:
        path, body = request
        http = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(http, timeout=60) as reply:
                status, payload = reply.status, reply.read()
                streamed = reply.headers["Content-Type"].startswith("text/event-stream")
        except urllib.error.HTTPError as exc:
            status, payload, streamed = exc.code, exc.read(), False
        check_http_answer(status, payload, streamed)

    one()
    all_alive(fuzzed, tiny_stack)
    request = urllib.request.Request(base + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4}).encode())
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["usage"]["completion_tokens"] >= 1


def test_random_grpc_requests_get_a_success_or_invalid_argument(fuzzed, tiny_stack):
    with grpc.insecure_channel(fuzzed.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        @seed(FUZZ_SEED)
        @FUZZ
        @given(grpc_requests())
        def one(request: gateway_pb2.GenerateRequest) -> None:
            try:
                chunks = list(stub.Generate(request, timeout=60))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
                assert exc.details()
                return
            assert chunks[-1].finish_reason in ("stop", "length"), chunks[-1]
            assert 1 <= chunks[-1].usage.completion_tokens <= MAX_OUTPUT

        one()
        all_alive(fuzzed, tiny_stack)
        assert stream(stub, make_request("hello", max_tokens=3)).last.finish_reason in ("length", "stop")
