"""Prompt and chat encoding with a model's fast tokenizer (`tokenizer.json`); its EOS ids and vocabulary size.

The service reads the files transformers reads and writes (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, the chat template, `generation_config.json`) with the `tokenizers` library and jinja2:
transformers' AutoTokenizer imports torch, which would make a CPU tokenizer replica carry ~400 MB it never uses.
`tokenizer.json` is used as written, with what transformers adds when it loads one: special tokens named in the
config but missing from the vocabulary. (transformers' model-specific classes may also rewrite the post-processor
from `add_bos_token`; a `tokenizer.json` that transformers saved already holds that.) A model without
`tokenizer.json` (a slow, SentencePiece-only tokenizer) is converted in this process by transformers, which then
imports torch.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer

from common.chat import CHAT_ROLES
from common.logs import clip
from tokenizer_service.chat_template import ChatTemplate, Message
from tokenizer_service.chat_tools import ToolDefinition, call_format, openai_tools, renders_tools, \
    without_template_support
from tokenizer_service.detokenizer import IncrementalDetokenizer
from tokenizer_service.token_bytes import TokenTexts

log = logging.getLogger("splitserve.tokenizer")

__all__ = ["CHAT_ROLES", "PromptTokenizer", "TokenizerInputError"]

SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json"]


MAX_MESSAGES = 65_536   # chat messages per request

class TokenizerInputError(ValueError):
    """The request cannot be tokenized as given (the servicer maps it to INVALID_ARGUMENT)."""


class PromptTokenizer:
    """One model's tokenizer: encodes prompts and chats, makes detokenizers for generated ids."""

    def __init__(self, path: str, name: str | None = None) -> None:
        folder = _local_folder(path)
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        self.backend = _load_backend(folder, config)
        self.name = name or os.path.basename(os.path.normpath(path))
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        special_tokens = _special_tokens(config)
        self.eos_token_ids = _eos_token_ids(self.backend, special_tokens.get("eos_token"), folder)
        source = _chat_template_source(folder, config)
        self.chat_template = ChatTemplate(source, special_tokens) if source else None
        self.has_chat_template = self.chat_template is not None
        self.template_renders_tools = self.chat_template is not None and renders_tools(self.chat_template.render)
        self.tool_call_format = call_format(source) if self.template_renders_tools and source else ""
        # transformers' decode applies clean_up_tokenization_spaces, except to BPE models (unless forced).
        self.cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self.backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self.token_texts = TokenTexts(self.backend)

    def encode_prompt(self, text: str) -> list[int]:
        if not text:
            raise TokenizerInputError("prompt is empty")
        # With the special tokens (BOS...): the same ids a user gets from tokenizer(text) + model.generate.
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_chat(self, messages: Sequence[Message | tuple[str, str]],
                    tools: Sequence[ToolDefinition] = ()) -> list[int]:
        """`messages`: template messages (chat_tools.template_message), or (role, content) pairs."""
        if self.chat_template is None:
            raise TokenizerInputError(f"model {self.name} has no chat template: send a prompt instead of messages")
        if not messages:
            raise TokenizerInputError("messages is empty")
        if len(messages) > MAX_MESSAGES:   # this port is reachable too: its own bound, above the gateway's
            raise TokenizerInputError(f"{len(messages)} messages; at most {MAX_MESSAGES} are rendered")
        conversation = [{"role": m[0], "content": m[1]} if isinstance(m, tuple) else m for m in messages]
        for index, message in enumerate(conversation):
            if message["role"] not in CHAT_ROLES:
                raise TokenizerInputError(
                    f"messages[{index}].role {clip(message['role'])!r} is not one of {', '.join(CHAT_ROLES)}")
        functions = openai_tools(tools)
        if not self.template_renders_tools:
            conversation = without_template_support(conversation, functions)
        try:
            text = self.chat_template.render(conversation, tools=functions or None)
        except jinja2.TemplateError as exc:  # templates raise it to reject a conversation (e.g. roles must alternate)
            raise TokenizerInputError(f"chat template rejected the messages: {exc}") from exc
        # The template wrote the special tokens itself (as transformers' apply_chat_template).
        return self.backend.encode(text, add_special_tokens=False).ids

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.backend, self.cleanup)


def _local_folder(path: str) -> Path:
    """A hub id is fetched once into the hub cache: only the tokenizer's files, not the weights."""
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(path, allow_patterns=TOKENIZER_FILES))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """Config files write a special token as its text or as an AddedToken's fields."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """Role -> text, what transformers passes to chat templates as special_tokens_map."""
    tokens = {role: _token_text(config.get(role)) for role in SPECIAL_TOKEN_ROLES}
    return {role: text for role, text in tokens.items() if text}


def _load_backend(folder: Path, config: dict[str, Any]) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        log.warning("no tokenizer.json in %s: converting its slow tokenizer with transformers", folder)
        from transformers import AutoTokenizer
        backend = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    special = _special_tokens(config)
    missing = [text for text in special.values() if backend.token_to_id(text) is None]
    if missing:
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
    return backend


def _chat_template_source(folder: Path, config: dict[str, Any]) -> str | None:
    """The default template: chat_template.jinja, else chat_template.json, else the config's (a text, or named
    templates of which "default" is the one used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template or None


def _eos_token_ids(backend: Tokenizer, eos_token: str | None, folder: Path) -> list[int]:
    """The tokenizer's EOS id plus the generation config's (chat models often end turns on another token)."""
    ids: list[int] = []
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    for token_id in [eos] if isinstance(eos, int) else (eos or []):
        if token_id not in ids:
            ids.append(token_id)
    return ids
