"""Structured output asked through OpenAI's API, read into `SamplingParams.structured_output`.

Where a request may ask for one (at most one of them, else 400 naming the fields):
- `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`, `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict", "description"}}` (OpenAI's; always enforced, `strict` or not);
- vLLM's `structured_outputs`: `{"json": <schema>}`, `{"regex": ...}`, `{"choice": [...]}`, `{"grammar": ...}`,
  `{"json_object": true}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

Each comes with the name of the field it was read from (`Constraint.param`): the engine compiles the constraint,
and its INVALID_ARGUMENT (a schema that is not one, an unknown `$ref`, a regex that does not parse...) is
answered naming that field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.openai.params import ParamError, text, type_name
from splitserve.v1 import common_pb2

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class Constraint:
    output: common_pb2.StructuredOutput
    param: str                 # the request field it came from


def _schema_text(value: Any, param: str) -> str:
    """A JSON Schema given as an object (or a boolean), or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ParamError(param, f"{param} is not valid JSON") from None
    if not isinstance(value, (dict, bool)):
        raise ParamError(param, f"{param} must be a JSON Schema (an object), got {type_name(value)}")
    return json.dumps(value, ensure_ascii=False)


def _kind(output: common_pb2.StructuredOutput, kind: str, value: Any, param: str) -> None:
    if kind == "json":
        output.json_schema = _schema_text(value, param)
    elif kind == "json_object":
        if value is not True:
            raise ParamError(param, f"{param} must be true (or left out)")
        output.json_object = True
    elif kind == "choice":
        if not isinstance(value, list) or not value:
            raise ParamError(param, f"{param} must be a non-empty array of strings")
        output.choice.choices.extend(text(item, f"{param}[{i}]") for i, item in enumerate(value))
    elif kind == "regex":
        output.regex = text(value, param)
    else:
        output.grammar = text(value, param)


def _response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise ParamError("response_format", f"response_format must be an object, got {type_name(value)}")
    kind = value.get("type")
    output = common_pb2.StructuredOutput()
    if kind == "text":
        return None
    if kind == "json_object":
        output.json_object = True
        return Constraint(output, "response_format")
    if kind != "json_schema":
        raise ParamError("response_format.type", 'response_format.type must be "text", "json_object" or '
                                                 f'"json_schema", got {json.dumps(kind)[:64]}')
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ParamError("response_format.json_schema", "response_format.json_schema must be an object with the "
                                                        "schema under 'schema'")
    for name in ("name", "description"):
        if spec.get(name) is not None:
            text(spec[name], f"response_format.json_schema.{name}")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ParamError("response_format.json_schema.strict", "response_format.json_schema.strict must be a boolean")
    if "schema" not in spec:
        raise ParamError("response_format.json_schema.schema", "response_format.json_schema.schema is required")
    output.json_schema = _schema_text(spec["schema"], "response_format.json_schema.schema")
    return Constraint(output, "response_format.json_schema.schema")


def _structured_outputs(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise ParamError("structured_outputs", f"structured_outputs must be an object, got {type_name(value)}")
    kinds = [kind for kind in STRUCTURED_OUTPUTS_KINDS if value.get(kind) is not None]
    if len(kinds) > 1:
        raise ParamError("structured_outputs", f"structured_outputs sets {', '.join(kinds)}: set only one")
    if not kinds:
        return None
    output = common_pb2.StructuredOutput()
    param = f"structured_outputs.{kinds[0]}"
    _kind(output, kinds[0], value[kinds[0]], param)
    return Constraint(output, param)


def constraint_from(body: dict[str, Any]) -> Constraint | None:
    """The one constraint the body asks for, or None; 400 naming the fields when it asks for several."""
    found: list[Constraint] = []
    response_format = body.get("response_format")
    if response_format is not None and (constraint := _response_format(response_format)) is not None:
        found.append(constraint)
    if body.get("structured_outputs") is not None and \
            (constraint := _structured_outputs(body["structured_outputs"])) is not None:
        found.append(constraint)
    for name, kind in GUIDED_FIELDS.items():
        if body.get(name) is not None:
            output = common_pb2.StructuredOutput()
            _kind(output, kind, body[name], name)
            found.append(Constraint(output, name))
    if len(found) > 1:
        names = ", ".join(constraint.param.split(".")[0] for constraint in found)
        raise ParamError(found[1].param.split(".")[0], f"the request asks for several output constraints ({names}); "
                                                        f"set only one")
    return found[0] if found else None
