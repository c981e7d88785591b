"""KV transfer in-process (no gRPC) on the tiny Llama: a prefill engine's exported blocks, written into a decode
engine, continue exactly as if the decode engine had computed the prompt; chunks are checked; a decode engine
without room refuses; an aborted transfer leaves no block behind."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from engine_service.engine import EngineFullError
from engine_service.kv_transfer import (KvExport, TransferError, decode, encode, join_received, layout_of,
                                        start_receiving, write_received)
from engine_service.sampling import SamplingParams
from engine_service.sequence import SequenceOutput, SequenceStatus
from tests.helpers import reference_greedy
from tests.unit.test_engine import BLOCK_BYTES, Collector, make_engine

PROMPT = list(range(300, 400))       # 100 tokens: 6 full blocks and a partial one; 2 steps of 64 on the prefill side


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    prefill, decoding = make_engine(tiny_model_dir, max_num_batched_tokens=64), make_engine(tiny_model_dir)
    yield prefill, decoding
    prefill.stop()
    decoding.stop()


def export_prompt(prefill, request_id: str, skip_blocks: int):
    """Runs the prompt on the prefill engine for its first token; returns the chunks sent and that token."""
    chunks, first, done = [], [], threading.Event()

    def on_output(output: SequenceOutput) -> None:
        first.extend(output.token_ids)
        done.set()

    seq = prefill.intake.sequence(request_id, PROMPT, SamplingParams(max_tokens=1), on_output)
    seq.export = KvExport(skip_blocks, 16, BLOCK_BYTES, chunks.append)
    prefill.add_sequence(seq)
    assert done.wait(60)
    return chunks, first[0]


def receive_prompt(prefill, engine, seq, export_id: str):
    """seq's prompt computed on the prefill engine and its blocks written into engine (not joined yet): returns the
    chunks sent, the blocks engine held already, and the first token."""
    skip = engine.call_in_loop(start_receiving, engine, seq).result(30)
    chunks, first = export_prompt(prefill, export_id, skip)
    layout = layout_of(engine)
    for chunk in chunks:
        engine.call_in_loop(write_received, engine, seq, chunk.first_block, decode(chunk, layout)).result(30)
    return chunks, skip, first


def test_transferred_blocks_continue_like_a_local_prefill(engines, tiny_model):
    prefill, decoding = engines
    collector = Collector()
    seq = decoding.intake.sequence("moved", PROMPT, SamplingParams(max_tokens=12), collector.callback("moved"))
    chunks, skip, first = receive_prompt(prefill, decoding, seq, "moved")
    assert len(chunks) >= 2 and chunks[0].first_block == skip       # sent as the two prefill steps ended
    decoding.call_in_loop(join_received, decoding, seq, first, None).result(30)
    collector.wait(1)
    assert collector.tokens["moved"] == reference_greedy(tiny_model, PROMPT, 12)
    assert decoding.stats().kv_blocks_used == 0 and prefill.stats().kv_blocks_used == 0

    # The same prompt again: the decode engine holds its full blocks now and asks only for the partial last one.
    again = decoding.intake.sequence("again", PROMPT, SamplingParams(max_tokens=1), lambda output: None)
    assert decoding.call_in_loop(start_receiving, decoding, again).result(30) == len(PROMPT) // 16
    decoding.abort("again")
    assert _idle(decoding)


def test_a_corrupted_chunk_is_refused(engines):
    prefill, decoding = engines
    chunks, _ = export_prompt(prefill, "corrupt", 0)
    chunk = chunks[0]
    chunk.payload = bytes([chunk.payload[0] ^ 1]) + chunk.payload[1:]
    with pytest.raises(TransferError) as error:
        decode(chunk, layout_of(decoding))
    assert error.value.code == grpc.StatusCode.DATA_LOSS
    assert encode(0, 1, torch.zeros(2, 2, 2, 16, 16)).crc32 != encode(0, 1, torch.ones(2, 2, 2, 16, 16)).crc32


def test_a_full_decode_engine_refuses_and_an_abort_frees_the_blocks(tiny_model_dir, engines):
    _, decoding = engines
    half = decoding.intake.sequence("half", PROMPT, SamplingParams(max_tokens=4), lambda output: None)
    decoding.call_in_loop(start_receiving, decoding, half).result(30)
    assert decoding.stats().kv_blocks_used > 0
    decoding.abort("half")                      # the prefill side died mid-transfer
    assert _idle(decoding)
    small = make_engine(tiny_model_dir, kv_blocks=8)    # room for one prompt of 7 blocks
    try:
        first = small.intake.sequence("first", PROMPT, SamplingParams(max_tokens=4), lambda output: None)
        small.call_in_loop(start_receiving, small, first).result(30)
        second = small.intake.sequence("second", PROMPT[::-1], SamplingParams(max_tokens=4), lambda output: None)
        with pytest.raises(EngineFullError):
            small.call_in_loop(start_receiving, small, second).result(30)
        small.abort("first")
        assert _idle(small)
    finally:
        small.stop()


def test_received_prompts_wait_for_a_place_in_the_batch(tiny_model_dir, engines, tiny_model):
    """A received prompt counts against --max-num-seqs as a local one: with the batch full it waits (its first
    token, computed by the prefill engine, goes out at once) and runs when a place frees."""
    prefill, _ = engines
    narrow = make_engine(tiny_model_dir, max_num_seqs=1)
    try:
        collector = Collector()
        moved = narrow.intake.sequence("moved", PROMPT, SamplingParams(max_tokens=12), collector.callback("moved"))
        _, _, first = receive_prompt(prefill, narrow, moved, "moved-narrow")
        busy = narrow.add_request("busy", list(range(500, 520)), SamplingParams(max_tokens=1500, ignore_eos=True),
                                  collector.callback("busy"))
        collector.wait_tokens("busy", 1)            # it runs: the one place in the batch is taken

        def join() -> int:
            join_received(narrow, moved, first, None)
            return len(busy.generated_ids)
        generated_at_join = narrow.call_in_loop(join).result(30)
        assert generated_at_join < 1000      # busy still has hundreds of steps to run
        collector.wait_tokens("busy", generated_at_join + 3)
        statuses = narrow.call_in_loop(lambda: (busy.status, moved.status, narrow.stats())).result(30)
        assert statuses[:2] == (SequenceStatus.RUNNING, SequenceStatus.READY)
        assert (statuses[2].running, statuses[2].waiting) == (1, 1)
        assert collector.tokens["moved"] == [first]          # its first token only: it has not run yet
        narrow.abort("busy")                                 # a place frees: the received prompt runs
        collector.wait(2)
        assert collector.reasons == {"busy": "abort", "moved": "length"}
        assert collector.tokens["moved"] == reference_greedy(tiny_model, PROMPT, 12)
        assert _idle(narrow)
    finally:
        narrow.stop()



def _idle(engine) -> bool:
    """Waits (through the loop's own queue) until the commands posted so far ran; True when no block is held."""
    engine.call_in_loop(lambda: None).result(30)   # the loop runs commands in order: the abort ran before it
    return engine.stats().kv_blocks_used == 0
