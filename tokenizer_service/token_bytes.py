"""Single tokens' own text and bytes, as log-probabilities show them (OpenAI's `token` and `bytes`).

A token is often part of a character (byte-level BPE splits 你 over two tokens), so `decode([id])` would give
U+FFFD. The exact bytes come from the vocabulary piece instead: byte-level BPE maps each byte to a printable
character (GPT-2's table), SentencePiece writes spaces as "▁" and raw bytes as `<0xNN>`. Special tokens keep their
text ("<|im_end|>"). Bytes that are not valid UTF-8 on their own are shown as "bytes:\\xNN..." (OpenAI's form).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "\u2581"


@dataclass(frozen=True)
class TokenText:
    text: str
    raw: bytes


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (what transformers' bytes_to_unicode builds)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def _decoder_types(backend: Tokenizer) -> str:
    return json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False)


def show(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


class TokenTexts:
    """Maps token ids to their TokenText for one tokenizer."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        decoder = _decoder_types(backend)
        self.byte_level = '"ByteLevel"' in decoder
        self.byte_fallback = '"ByteFallback"' in decoder
        self.metaspace = '"Metaspace"' in decoder or METASPACE in decoder
        self.added = {token_id: token.content for token_id, token in backend.get_added_tokens_decoder().items()}

    def raw(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return self.backend.decode([token_id]).encode("utf-8")
        if self.byte_level:
            table = _byte_level_table()
            if all(char in table for char in piece):
                return bytes(table[char] for char in piece)
        if self.byte_fallback and (match := _BYTE_TOKEN.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        if self.metaspace:
            return piece.replace(METASPACE, " ").encode("utf-8")
        return self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def lookup(self, token_ids: Sequence[int]) -> list[TokenText]:
        return [TokenText(show(raw), raw) for raw in map(self.raw, token_ids)]
