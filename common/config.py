"""One dataclass per service, filled from command-line flags and environment variables (flags win)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def load_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Builds `cls` from `--field-name` flags, else `FIELD_NAME` environment variables, else the defaults.

    A field's environment variable is its name upper-cased; a field may name another through
    `metadata={"env": "NAME"}` (e.g. MODEL). Help text comes from `metadata={"help": ...}`. A renamed field keeps
    its old names for a release with `metadata={"deprecated_names": ("old_name",)}`: `--old-name` and OLD_NAME
    still work (after the new ones) and log a deprecation warning.
    """
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)
    converters: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[field.name]
        convert = _parse_bool if kind is bool else kind
        if typing.get_origin(kind) is typing.Union or str(kind).startswith("str |"):
            convert = str
        converters[field.name] = convert
        env_name = field.metadata.get("env", field.name.upper())
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=convert,
            default=None,
            help=f"{field.metadata.get('help', '')} (env {env_name}, default {field.default!r})",
        )
        for old in field.metadata.get("deprecated_names", ()):
            parser.add_argument("--" + old.replace("_", "-"), dest=old, type=convert, default=None,
                                help=f"deprecated: use --{field.name.replace('_', '-')}")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, field.name)
        if value is None:
            env_name = field.metadata.get("env", field.name.upper())
            raw = os.environ.get(env_name)
            if raw is not None and raw != "":
                try:
                    value = converters[field.name](raw)
                except ValueError as exc:
                    parser.error(f"environment variable {env_name}: {exc}")
        for old in field.metadata.get("deprecated_names", ()) if value is None else ():
            value = getattr(args, old)
            if value is None and os.environ.get(old.upper()):
                try:
                    value = converters[field.name](os.environ[old.upper()])
                except ValueError as exc:
                    parser.error(f"environment variable {old.upper()}: {exc}")
            if value is not None:
                logging.getLogger("splitserve.config").warning(
                    "--%s / %s is deprecated and goes in the next release: use --%s / %s", old.replace("_", "-"),
                    old.upper(), field.name.replace("_", "-"), field.metadata.get("env", field.name.upper()))
                break
        if value is not None:
            values[field.name] = value
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def describe(config: Any) -> str:
    """One line with every field, for the start-up log (secrets shown only as set or not)."""
    return " ".join(f"{f.name}={'<set>' if getattr(config, f.name) else '<unset>'}" if f.metadata.get("secret")
                    else f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))
