"""The text of tokens named in log-probabilities, asked of the tokenizer once per id and remembered (a vocabulary
is at most a few hundred thousand short strings; after warm-up nearly every lookup is local)."""
from __future__ import annotations

from collections.abc import Callable

import grpc

from gateway.errors import from_rpc_error
from splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc


class TokenTextCache:
    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, address: str) -> None:
        self.stub = stub
        self.address = address
        self.texts: dict[int, tokenizer_pb2.TokenText] = {}

    async def fill(self, logprobs: list[common_pb2.TokenLogprobs],
                   remaining: Callable[[], float | None]) -> dict[int, bytes]:
        """Sets `token` on each entry and alternative; returns the raw bytes of every id named."""
        ids = {lp.token_id for lp in logprobs} | {top.token_id for lp in logprobs for top in lp.top}
        missing = sorted(ids - self.texts.keys())
        if missing:
            try:
                reply = await self.stub.TokenTexts(tokenizer_pb2.TokenTextsRequest(token_ids=missing),
                                                   timeout=remaining())
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, "tokenizer", self.address) from None
            self.texts.update(zip(missing, reply.texts))
        for lp in logprobs:
            lp.token = self.texts[lp.token_id].text
            for top in lp.top:
                top.token = self.texts[top.token_id].text
        return {token_id: self.texts[token_id].raw for token_id in ids}
