"""Stop strings on a text stream: held back while they may start, cut when seen, never returned."""
from __future__ import annotations

import random

import pytest

from gateway.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces))
    return out, matcher.stopped


def test_no_stop_strings_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("hello") == "hello"
    assert not matcher.stopped


def test_stop_inside_one_chunk():
    assert run(["END"], ["abc END def"]) == ("abc ", True)


def test_stop_spanning_chunks_is_never_emitted():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hello ST") == "hello "
    assert matcher.feed("O") == ""
    assert matcher.feed("P and more") == ""
    assert matcher.stopped


def test_false_start_is_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("a ST") == "a "
    assert matcher.feed("AY") == "STAY"
    assert not matcher.stopped


def test_held_text_is_flushed_at_the_end():
    assert run(["STOP"], ["the end ST"]) == ("the end ST", False)


def test_earliest_of_several_stops_wins():
    assert run(["world", "lo w"], ["hello world"]) == ("hel", True)


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_agree_with_a_plain_search(seed):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    positions = [text.find(s) for s in stops if text.find(s) >= 0]
    expected = text[: min(positions)] if positions else text
    assert run(stops, pieces) == (expected, bool(positions))
