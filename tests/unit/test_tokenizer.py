"""PromptTokenizer: prompts and chats encode exactly as Hugging Face does; bad input raises a clear ValueError."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.models import resolve_model
from tokenizer_service.tokenizer import CHAT_ROLES, PromptTokenizer, TokenizerInputError

PROMPTS = ["Hello, world!", "你好，世界 🙂", "def f(x):\n    return x ** 2\n", "  leading spaces and <|im_end|> inside"]


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def prompt_tokenizer(smollm2_path: str) -> PromptTokenizer:
    return PromptTokenizer(smollm2_path, name="SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def hf(smollm2_path: str):
    return AutoTokenizer.from_pretrained(smollm2_path)


def copy_tokenizer_files(source: str, target: Path) -> Path:
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, target / name)
    return target


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_ids_match_what_a_user_passes_to_generate(prompt_tokenizer: PromptTokenizer, hf, text: str) -> None:
    assert prompt_tokenizer.encode_prompt(text) == hf(text).input_ids


def test_chat_uses_the_template_with_a_generation_prompt(prompt_tokenizer: PromptTokenizer, hf) -> None:
    messages = [("system", "Be brief."), ("user", "Hi 你好"), ("assistant", "Hello!"), ("user", "2+2?")]
    ids = prompt_tokenizer.encode_chat(messages)
    conversation = [{"role": role, "content": content} for role, content in messages]
    assert ids == hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert hf.decode(ids).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_every_chat_role_is_accepted(prompt_tokenizer: PromptTokenizer, hf) -> None:
    for role in CHAT_ROLES:
        assert f"<|im_start|>{role}\nhello" in hf.decode(prompt_tokenizer.encode_chat([(role, "hello")]))


@pytest.mark.parametrize("call, message", [
    (lambda t: t.encode_prompt(""), "prompt is empty"),
    (lambda t: t.encode_chat([]), "messages is empty"),
    (lambda t: t.encode_chat([("user", "hi"), ("robot", "beep")]), "messages\\[1\\].role 'robot'"),
])
def test_bad_input_raises_a_value_error_naming_the_problem(prompt_tokenizer: PromptTokenizer, call, message) -> None:
    with pytest.raises(TokenizerInputError, match=message) as caught:
        call(prompt_tokenizer)
    assert isinstance(caught.value, ValueError)


def test_model_without_chat_template_rejects_messages(smollm2_path: str, tmp_path: Path) -> None:
    folder = copy_tokenizer_files(smollm2_path, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    tokenizer = PromptTokenizer(str(folder))
    assert not tokenizer.has_chat_template and tokenizer.name == "no-template"
    with pytest.raises(TokenizerInputError, match="no chat template"):
        tokenizer.encode_chat([("user", "hi")])
    assert tokenizer.encode_prompt("hi")  # prompts still work


def test_info_has_vocab_size_and_every_eos_id(prompt_tokenizer: PromptTokenizer, hf, smollm2_path: str,
                                              tmp_path: Path) -> None:
    assert prompt_tokenizer.vocab_size == len(hf) == 49152
    assert prompt_tokenizer.eos_token_ids == [hf.eos_token_id]
    assert prompt_tokenizer.name == "SmolLM2-135M-Instruct" and prompt_tokenizer.has_chat_template
    # A generation config may end generation on more tokens than the tokenizer's EOS (chat models often do).
    folder = copy_tokenizer_files(smollm2_path, tmp_path / "more-eos")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [0, 2]}))
    assert PromptTokenizer(str(folder)).eos_token_ids == [hf.eos_token_id, 0]
    (folder / "generation_config.json").unlink()
    assert PromptTokenizer(str(folder)).eos_token_ids == [hf.eos_token_id]


def test_detokenizer_round_trips_generated_text(prompt_tokenizer: PromptTokenizer) -> None:
    ids = prompt_tokenizer.backend.encode("Sure — 你好 🙂!", add_special_tokens=False).ids
    detokenizer = prompt_tokenizer.detokenizer()
    assert "".join(detokenizer.add([token_id]) for token_id in ids) + detokenizer.add([], final=True) == "Sure — 你好 🙂!"


def test_a_template_that_rejects_the_conversation_raises_a_value_error(smollm2_path: str, tmp_path: Path) -> None:
    folder = copy_tokenizer_files(smollm2_path, tmp_path / "strict-template")
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be from the user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = PromptTokenizer(str(folder))
    with pytest.raises(TokenizerInputError, match="first message must be from the user"):
        tokenizer.encode_chat([("assistant", "hi")])
    assert tokenizer.encode_chat([("user", "hi")])
