"""Structured output through the real stack on the tiny random model: whatever garbage the model prefers, the
grammar masks make every output valid (JSON schema, regex, choice, grammar); constraints compose with batching,
prompt-lookup speculation, n > 1, beam search and the prefix cache; bad constraints are INVALID_ARGUMENT naming the
field, at the gateway and at the engine's own port; a slow compile does not stall running streams; aborted
constrained requests give back their blocks and matchers."""
from __future__ import annotations

import ast
import json
import re
import threading
import uuid

import grpc
import jsonschema
import pytest

from common.decoding import MAX_CHOICES, MAX_STRUCTURED_TEXT_CHARS
from tests.helpers import assert_equals_generate, make_request, prompt_ids, rpc_error, stream, stream_all
from tests.integration.test_lifecycle import scrape, wait_until
from splitserve.v1 import common_pb2, engine_pb2

PROMPT = "Describe a person as JSON:"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
CHOICES = ["red", "green", "blue 🙂"]
# Arithmetic expressions, bounded so that even a random model ends them within max_tokens.
GRAMMAR = """root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" num ("+" num){0,2} ")"
num ::= [1-9] [0-9]{0,2}
"""
MAX_TOKENS = 160


def constraint(kind: str, value: object = None) -> common_pb2.StructuredOutput:
    if kind == "json_schema":
        return common_pb2.StructuredOutput(json_schema=json.dumps(value or SCHEMA))
    if kind == "regex":
        return common_pb2.StructuredOutput(regex=value or REGEX)
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=CHOICES if value is None else value))
    if kind == "grammar":
        return common_pb2.StructuredOutput(grammar=value or GRAMMAR)
    return common_pb2.StructuredOutput(json_object=True)


def constrained(kind: str, prompt: str = PROMPT, **sampling: object):
    sampling.setdefault("max_tokens", MAX_TOKENS)
    return make_request(prompt, structured_output=constraint(kind), **sampling)


def assert_valid(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "grammar":
        tree = ast.parse(text, mode="eval")   # an arithmetic expression: numbers and + - * / only
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text
    else:
        assert isinstance(json.loads(text), dict), text


def assert_finished_valid(kind: str, got) -> None:
    assert got.last.finish_reason == "stop", (kind, got.text)
    assert_valid(kind, got.text)


KINDS = ("json_schema", "regex", "choice", "grammar")


def test_every_output_is_valid_greedy_and_sampled(gateway):
    """Each kind greedy, and at temperature 1 with three seeds: all at once, every output valid and finished."""
    cases = [(kind, {"temperature": 0.0}) for kind in KINDS]
    cases += [(kind, {"temperature": 1.0, "seed": seed}) for kind in KINDS for seed in (1, 2, 3)]
    results = stream_all(gateway, [constrained(kind, **params) for kind, params in cases], concurrency=len(cases))
    for (kind, _), got in zip(cases, results):
        assert_finished_valid(kind, got)


def test_constrained_and_unconstrained_batched_together(gateway, tiny_model, tokenizer):
    """8 at once: the unconstrained ones are still token-identical to generate."""
    plain = [f"Tell me about item {i}" for i in range(4)]
    requests = [make_request(p, max_tokens=24, temperature=0.0) for p in plain]
    requests += [constrained(kind, temperature=0.0) for kind in KINDS]
    results = stream_all(gateway, requests, concurrency=8)
    for prompt, got in zip(plain, results[:4]):
        assert_equals_generate(got, tiny_model, tokenizer, prompt, 24)
    for kind, got in zip(KINDS, results[4:]):
        assert_finished_valid(kind, got)


def test_prompt_lookup_speculation_gives_the_same_output(gateway):
    """Greedy: prompt-lookup drafts the grammar refuses are not accepted, the rest is plain greedy."""
    prompt = 'Repeat: {"name": "abc", "age": 12, "pet": "cat", "tags": ["x"], "ok": true} ' * 2
    for kind in ("json_schema", "grammar"):
        plain = stream(gateway, constrained(kind, prompt, temperature=0.0))
        fast = stream(gateway, constrained(kind, prompt, temperature=0.0, speculative="prompt_lookup",
                                           num_speculative_tokens=4))
        assert fast.token_ids == plain.token_ids
        assert_finished_valid(kind, fast)


def test_n_completions_and_beams_each_follow_the_constraint(gateway):
    sampled = stream(gateway, constrained("json_schema", temperature=1.0, seed=7, n=4))
    beams = stream(gateway, constrained("json_schema", temperature=0.0, num_beams=3))
    completions: dict[int, list] = {}
    for chunk in sampled.chunks:
        completions.setdefault(chunk.index, []).append(chunk)
    assert sorted(completions) == [0, 1, 2, 3]
    for chunks in completions.values():
        assert chunks[-1].finish_reason == "stop"
        assert_valid("json_schema", "".join(c.text for c in chunks))
    assert_finished_valid("json_schema", beams)


def test_prefix_cache_hit_gives_the_same_output(gateway, tiny_stack):
    prompt = "A long shared system prompt about people and their pets. " * 6 + PROMPT
    first = stream(gateway, constrained("json_schema", prompt, temperature=0.0))
    hits = scrape(tiny_stack.ports.engine_metrics)["splitserve_engine_prefix_cache_hits_total"]
    second = stream(gateway, constrained("json_schema", prompt, temperature=0.0))
    assert scrape(tiny_stack.ports.engine_metrics)["splitserve_engine_prefix_cache_hits_total"] > hits
    assert second.token_ids == first.token_ids
    assert_finished_valid("json_schema", second)


BAD = {
    "invalid JSON schema": (common_pb2.StructuredOutput(json_schema='{"type": "object", "properties": 5}'),
                            "structured_output.json_schema"),
    "not JSON at all": (common_pb2.StructuredOutput(json_schema="{nope"), "structured_output.json_schema"),
    "unknown $ref": (common_pb2.StructuredOutput(json_schema='{"$ref": "#/$defs/missing"}'),
                     "structured_output.json_schema"),
    "invalid regex": (common_pb2.StructuredOutput(regex="a(b"), "structured_output.regex"),
    "empty choice list": (common_pb2.StructuredOutput(choice=common_pb2.ChoiceList()), "structured_output.choice"),
    "grammar that does not parse": (common_pb2.StructuredOutput(grammar='root ::= "a" missing_rule'),
                                    "structured_output.grammar"),
    "no kind set": (common_pb2.StructuredOutput(), "structured_output"),
    "over-size schema": (common_pb2.StructuredOutput(json_schema=" " * (MAX_STRUCTURED_TEXT_CHARS + 1)),
                         "structured_output.json_schema"),
    "too many choices": (common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(
        choices=[str(i) for i in range(MAX_CHOICES + 1)])), "structured_output.choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_constraints_are_invalid_argument_naming_the_field(gateway, engine, tokenizer, case):
    bad, field = BAD[case]
    error = rpc_error(lambda: gateway.Generate(make_request(PROMPT, max_tokens=8, structured_output=bad), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in error.details(), error.details()
    assert ".cc" not in error.details() and "/project" not in error.details(), error.details()   # no internals
    # The engine's own port checks it too.
    prefill = engine_pb2.PrefillRequest(request_id=f"bad-{uuid.uuid4().hex}", prompt_token_ids=prompt_ids(
        tokenizer, PROMPT), sampling=common_pb2.SamplingParams(max_tokens=8, structured_output=bad))
    error = rpc_error(lambda: engine.Prefill(prefill, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details(), error.details()
    # ... and both serve the next request.
    assert_finished_valid("choice", stream(gateway, constrained("choice")))


def large_schema() -> str:
    """A cold, slow compile (seconds: xgrammar builds each pattern's token tables), names never seen before (no
    cache hit)."""
    tag = uuid.uuid4().hex[:8]
    properties = {f"{tag}_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 7 + 30}}}-[0-9]{{2,9}}$"}
                  for i in range(30)}
    return json.dumps({"type": "object", "properties": properties, "required": list(properties)[:15]})


def drain(call, received: list[int] | None = None) -> None:
    """Reads a stream to its end (or its cancellation), counting the tokens of each chunk into `received`."""
    try:
        for chunk in call:
            if received is not None:
                received.append(len(chunk.token_ids))
    except grpc.RpcError:
        pass


def test_a_slow_compile_does_not_stall_running_streams(gateway, tiny_stack):
    """While the large schema's compile is in progress (its histogram has not counted it yet), a running stream
    keeps delivering tokens: the compile is off the step loop."""
    port = tiny_stack.ports.engine_metrics
    running = gateway.Generate(make_request("a long story:", max_tokens=1500, ignore_eos=True), timeout=300)
    received = [len(next(running).token_ids)]
    threading.Thread(target=drain, args=(running, received), daemon=True).start()
    compiled_before = scrape(port).get("splitserve_engine_structured_compile_seconds_count", 0.0)
    slow = gateway.Generate(make_request(PROMPT, max_tokens=4, structured_output=common_pb2.StructuredOutput(
        json_schema=large_schema())), timeout=300)
    slow_done = threading.Event()
    threading.Thread(target=lambda: (drain(slow), slow_done.set()), daemon=True).start()
    try:
        def compiling() -> bool:
            return scrape(port).get("splitserve_engine_structured_compile_seconds_count", 0.0) == compiled_before

        assert wait_until(lambda: scrape(port).get("splitserve_engine_structured_requests_total"
                                                   '{kind="json_schema"}', 0) > 0, timeout=60)
        at_start = sum(received)
        # Tokens keep coming while the compile is still in progress.
        assert wait_until(lambda: sum(received) >= at_start + 3 or not compiling(), timeout=120)
        assert compiling(), "the compile ended before the stream was seen to progress: make the schema larger"
        assert sum(received) >= at_start + 3
    finally:
        running.cancel()
        slow_done.wait(timeout=300)


def test_aborted_constrained_streams_give_back_blocks_and_matchers(gateway, engine, tiny_stack):
    before = engine.GetStats(engine_pb2.GetStatsRequest())
    long_regex = common_pb2.StructuredOutput(regex="[a-z ]{400,600}")
    calls = [gateway.Generate(make_request(f"story {i}:", max_tokens=600, structured_output=long_regex,
                                           temperature=1.0, seed=i), timeout=120) for i in range(4)]
    for call in calls:
        next(call)       # every stream is producing
    assert wait_until(lambda: scrape(tiny_stack.ports.engine_metrics)["splitserve_engine_structured_matchers"] == 4,
                      timeout=30)
    for call in calls:
        call.cancel()

    def all_back() -> bool:
        stats = engine.GetStats(engine_pb2.GetStatsRequest())
        return (stats.running == 0 and stats.kv_blocks_used == before.kv_blocks_used and
                scrape(tiny_stack.ports.engine_metrics)["splitserve_engine_structured_matchers"] == 0)

    assert wait_until(all_back, timeout=60), engine.GetStats(engine_pb2.GetStatsRequest())
