"""Prompt and chat encoding with a Hugging Face fast tokenizer; the model's EOS ids and vocabulary size."""
from __future__ import annotations

import os
from collections.abc import Sequence

import jinja2
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from common.chat import CHAT_ROLES
from tokenizer_service.detokenizer import IncrementalDetokenizer
from tokenizer_service.token_texts import TokenTexts


class TokenizerInputError(ValueError):
    """The request cannot be tokenized as given (the servicer maps it to INVALID_ARGUMENT)."""


class PromptTokenizer:
    """Wraps one HF fast tokenizer: encodes prompts and chats, makes detokenizers for generated ids."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        self.name = name or os.path.basename(os.path.normpath(path))
        self.vocab_size = len(self.tokenizer)  # counts added tokens, unlike tokenizer.vocab_size
        self.eos_token_ids = _eos_token_ids(self.tokenizer, path)
        self.has_chat_template = bool(self.tokenizer.chat_template)
        self.token_texts = TokenTexts(self.tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        if not text:
            raise TokenizerInputError("prompt is empty")
        # HF's default add_special_tokens=True: the same ids a user gets from tokenizer(text) + model.generate.
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise TokenizerInputError(f"model {self.name} has no chat template: send a prompt instead of messages")
        if not messages:
            raise TokenizerInputError("messages is empty")
        for index, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise TokenizerInputError(
                    f"messages[{index}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            encoded = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as exc:  # templates raise it to reject a conversation (e.g. roles must alternate)
            raise TokenizerInputError(f"chat template rejected the messages: {exc}") from exc
        # transformers 5 returns a BatchEncoding here; older versions a plain list.
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return list(ids)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)


def _eos_token_ids(tokenizer: PreTrainedTokenizerBase, path: str) -> list[int]:
    """The tokenizer's EOS id plus the generation config's (chat models often end turns on another token)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        for token_id in [eos] if isinstance(eos, int) else (eos or []):
            if token_id not in ids:
                ids.append(token_id)
    return ids
