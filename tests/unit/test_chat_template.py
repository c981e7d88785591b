"""The tokenizer service renders chat templates and reads tokenizer folders as transformers does, without it:
the same text and ids as `apply_chat_template` / `tokenizer(text)` on SmolLM2's files, on conversations and on a
template that uses every helper transformers gives templates; and its modules never import torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from common.models import resolve_model
from tests.unit.test_tokenizer import copy_tokenizer_files
from tokenizer_service.chat_template import ChatTemplate
from tokenizer_service.tokenizer import PromptTokenizer

CONVERSATIONS = {
    "user": [("user", "What is the capital of France?")],
    "system-user-assistant": [("system", "Be brief."), ("user", "Hi 你好"), ("assistant", "Hello!"),
                              ("user", "2+2?")],
    "multilingual": [("user", "Ελληνικά, русский, العربية, हिन्दी 🙂"), ("assistant", "日本語のテキスト and 한국어"),
                     ("user", "naïve café — 讲个笑话")],
    "tool": [("user", "weather?"), ("assistant", "calling"), ("tool", '{"temperature": 21}')],
    "whitespace": [("user", "  leading\n\ttabs and trailing  \n"), ("assistant", "")],
}

# Every helper and setting transformers gives templates: trim_blocks / lstrip_blocks, loop controls, namespace,
# tojson with indent (non-ASCII kept), the special tokens, tools, {% generation %}, strftime_now, raise_exception.
FEATURES_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% if tools %}
    Tools:
    {{ tools | tojson(indent=2) }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
    {% if message['content'] == '' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['role'] }}: {{ message['content'] | tojson }}{{ eos_token }}{% endgeneration %}
    {% else %}
        {{ message['role'] }}: {{ message['content'] }}
    {% endif %}
{% endfor %}
{{ ns.count }} messages, year {{ strftime_now('%Y') }}
{% if add_generation_prompt %}assistant:{% endif %}
{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first message must not be the assistant') }}{% endif %}"""
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Wetter für eine Stadt 🌦",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def ours(smollm2_path: str) -> PromptTokenizer:
    return PromptTokenizer(smollm2_path)


@pytest.fixture(scope="module")
def hf(smollm2_path: str):
    return AutoTokenizer.from_pretrained(smollm2_path)


def as_dicts(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation-prompt", "no-generation-prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversations_render_and_encode_as_apply_chat_template(ours: PromptTokenizer, hf, name: str,
                                                                add_generation_prompt: bool) -> None:
    conversation = as_dicts(CONVERSATIONS[name])
    assert ours.chat_template is not None
    text = ours.chat_template.render(conversation, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    if add_generation_prompt:   # what the service sends the engine
        assert ours.encode_chat(CONVERSATIONS[name]) == hf.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation-prompt", "no-generation-prompt"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_every_template_helper_renders_as_transformers(ours: PromptTokenizer, hf, tools, add_generation_prompt) -> None:
    conversation = as_dicts([("system", "Σύστημα"), ("user", "Hi 你好"), ("user", ""),
                             ("assistant", 'Say "ok" 🙂'), ("stop", "never shown")])
    template = ChatTemplate(FEATURES_TEMPLATE, ours.chat_template.special_tokens)
    text = template.render(conversation, add_generation_prompt=add_generation_prompt, tools=tools)
    assert text == hf.apply_chat_template(conversation, chat_template=FEATURES_TEMPLATE, tools=tools,
                                          add_generation_prompt=add_generation_prompt, tokenize=False)
    assert "<|im_start|>" in text and "<|im_end|>" in text and "3 messages" in text and "never shown" not in text
    assert ('[\n  {\n    "type": "function"' in text and "Wetter für eine Stadt 🌦" in text) == bool(tools)   # indent 2


def test_a_template_can_reject_a_conversation_and_cannot_reach_python_internals(ours: PromptTokenizer) -> None:
    template = ChatTemplate(FEATURES_TEMPLATE, ours.chat_template.special_tokens)
    with pytest.raises(jinja2.TemplateError, match="must not be the assistant"):
        template.render(as_dicts([("assistant", "hi")]))
    for source in ("{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
                   "{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            ChatTemplate(source, {}).render(as_dicts([("user", "hi")]))


def test_a_special_token_missing_from_the_vocabulary_is_added_as_in_transformers(smollm2_path: str,
                                                                                 tmp_path: Path) -> None:
    folder = copy_tokenizer_files(smollm2_path, tmp_path / "new-special")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "sep_token": "<|brand_new_sep|>"}))
    hf, ours = AutoTokenizer.from_pretrained(folder), PromptTokenizer(str(folder))
    for text in ("Hello, world!", "你好 <|brand_new_sep|> 🙂"):
        assert ours.encode_prompt(text) == hf(text).input_ids
    assert ours.vocab_size == len(hf) == 49153
    ids = ours.encode_prompt("a <|brand_new_sep|> b")
    assert ours.detokenizer().add(ids, final=True) == hf.decode(ids, skip_special_tokens=True) == "a  b"


def test_the_tokenizer_services_modules_never_import_torch(smollm2_path: str) -> None:
    """A CPU tokenizer replica carries no torch (~400 MB): loading, encoding, chats and detokenizing."""
    script = (
        "import sys\n"
        "import tokenizer_service.__main__\n"
        "from tokenizer_service.tokenizer import PromptTokenizer\n"
        f"tokenizer = PromptTokenizer({smollm2_path!r})\n"
        "ids = tokenizer.encode_chat([('user', 'Hi 你好')])\n"
        "assert tokenizer.detokenizer().add(ids, final=True)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
