"""A model's chat template, rendered as transformers' `apply_chat_template` renders it, without transformers.

Chat templates are Jinja written for transformers' environment, so this one offers the same: a sandbox that
cannot change its inputs, `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`break`,
`continue`), `{% generation %}` blocks (rendered as their body: we never ask for assistant masks), and the helpers
templates call: `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that keeps non-ASCII text
and takes `indent` (Jinja's own escapes HTML and sorts keys). Templates come from model repositories: untrusted
code, hence the sandbox, and `namespace` objects that refuse underscore names. The variables are transformers':
`messages` (keys whose value is None dropped), `tools`, `documents`, `add_generation_prompt` and the special tokens
by role (`bos_token`, `eos_token`, ...).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders its body."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` whose attributes cannot be dunder or private names (no way into Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:   # Jinja's signature trick: `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                               dict=dict)
    return environment.from_string(source)


class ChatTemplate:
    """One model's template; `render` raises jinja2.TemplateError when the template rejects the conversation."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens   # role -> token text, as transformers' special_tokens_map
        self._template = _compile(source)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        conversation = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return self._template.render(**self.special_tokens, messages=conversation, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt)
