"""Single tokens' text and bytes (log-probabilities' `token` and `bytes`): exact bytes even for part of a character,
for byte-level BPE (SmolLM2) and SentencePiece-style byte fallback; the tokenizer's TokenTexts RPC."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from common.models import resolve_model
from common.server import start_grpc_server
from splitserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service.server import TokenizerServicer
from tokenizer_service.token_bytes import TokenTexts, show
from tokenizer_service.tokenizer import PromptTokenizer


@pytest.fixture(scope="module")
def smollm2() -> PromptTokenizer:
    return PromptTokenizer(resolve_model("smollm2"))


def test_byte_level_tokens_concatenate_to_the_text_and_split_characters_show_their_bytes(smollm2):
    text = "你好 🙂 the cat"
    ids = smollm2.encode_prompt(text)
    texts = smollm2.token_texts.lookup(ids)
    assert b"".join(t.raw for t in texts).decode("utf-8") == text
    assert texts[0].text == "bytes:\\xe4\\xbd" and texts[0].raw == "你".encode()[:2]
    assert [t.text for t in texts[-2:]] == [" the", " cat"]


def test_special_tokens_keep_their_text(smollm2):
    eos = smollm2.backend.token_to_id("<|im_end|>")
    assert smollm2.token_texts.lookup([eos])[0].text == "<|im_end|>"


def test_ids_outside_the_vocabulary_are_refused(smollm2):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2.token_texts.lookup([smollm2.vocab_size])


def test_sentencepiece_byte_fallback_and_metaspace():
    vocab = {"<unk>": 0, "\u2581": 1, "a": 2, "\u2581a": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    texts = TokenTexts(tokenizer.backend_tokenizer)
    ids = tokenizer("a 你", add_special_tokens=False).input_ids
    got = texts.lookup(ids)
    assert got[0].text == " a"
    assert b"".join(t.raw for t in got[2:]) == "你".encode()
    assert got[2].text == "bytes:\\xe4"


def test_show_uses_openais_form_for_partial_characters():
    assert show(b" ok") == " ok"
    assert show(b"\xf0\x9f") == "bytes:\\xf0\\x9f"


def test_token_texts_rpc(smollm2):
    async def scenario():
        service = await start_grpc_server(
            lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(smollm2), server),
            ["splitserve.v1.Tokenizer"], "127.0.0.1", 0, None)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = tokenizer_pb2_grpc.TokenizerStub(channel)
                ids = smollm2.encode_prompt("hello 你")
                reply = await stub.TokenTexts(tokenizer_pb2.TokenTextsRequest(token_ids=ids))
                assert b"".join(t.raw for t in reply.texts).decode() == "hello 你"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.TokenTexts(tokenizer_pb2.TokenTextsRequest(token_ids=[-1]))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await service.server.stop(None)

    asyncio.run(scenario())
