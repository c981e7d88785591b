"""Fields of OpenAI's request JSON read with their types checked: a wrong type is a 400 naming the field."""
from __future__ import annotations

from typing import Any

import grpc

from gateway.errors import GatewayError

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class ParamError(GatewayError):
    """A bad field of the OpenAI request: INVALID_ARGUMENT, naming the field in `param`."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ParamError(param, f"{param} must be a string, got {type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(param, f"{param} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def integer(body: dict[str, Any], name: str, bounds: tuple[int, int] = INT32) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {type_name(value)}")
    if not bounds[0] <= value <= bounds[1]:
        raise ParamError(name, f"{name} must be between {bounds[0]} and {bounds[1]}, got {value}")
    return value


def number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"{name} must be a number, got {type_name(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ParamError(name, f"{name} must be a finite number") from None


def boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ParamError(name, f"{name} must be a boolean, got {type_name(value)}")
    return value
