"""Turns request-validation errors (and client-caused file errors) into one ErrorResponse detail that
names each bad field.

FastAPI's own 422 body is a list of pydantic error objects; the operator and people want one line,
e.g. "spec.training.groupSize: must be >= 2".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

# Where the value came from; the body's fields are named from the body's root, as on the wire.
_SOURCES = {"body", "path", "query", "header", "cookie"}


def field_path(loc: Sequence[int | str]) -> str:
    """("body", "spec", "samples", 0, "prompt") -> "spec.samples[0].prompt"."""
    parts = list(loc)
    if parts and parts[0] in _SOURCES:
        source = parts.pop(0)
        if not parts:
            return "body" if source == "body" else str(source)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    match kind:
        case "missing":
            return "required"
        case "extra_forbidden":
            return "unknown field"
        case "greater_than_equal":
            return f"must be >= {ctx.get('ge')}"
        case "greater_than":
            return f"must be > {ctx.get('gt')}"
        case "less_than_equal":
            return f"must be <= {ctx.get('le')}"
        case "less_than":
            return f"must be < {ctx.get('lt')}"
        case "string_too_short":
            return f"must have at least {ctx.get('min_length')} characters"
        case "string_too_long":
            return f"must have at most {ctx.get('max_length')} characters"
        case "too_short":
            return f"must have at least {ctx.get('min_length')} items"
        case "too_long":
            return f"must have at most {ctx.get('max_length')} items"
        case "string_pattern_mismatch":
            return f"must match {ctx.get('pattern')}"
        case "literal_error":
            return f"must be one of {ctx.get('expected')}"
        case "json_invalid":
            return f"invalid JSON ({ctx.get('error', 'cannot parse')})"
    msg = str(error.get("msg", "invalid"))
    # pydantic prefixes messages of custom validators; the field path already says where.
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def describe(errors: Iterable[Mapping[str, Any]]) -> str:
    """One line naming every bad field, in the order pydantic found them, without repeats."""
    lines: list[str] = []
    for error in errors:
        line = f"{field_path(error.get('loc', ()))}: {_message(error)}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines) or "invalid request"


def client_file_error(error: OSError, files: Mapping[str, str | None]) -> str | None:
    """The 422 detail of an OSError on a path the client chose (FileNotFoundError, PermissionError,
    IsADirectoryError, NotADirectoryError, ...), naming its field; None when the error is about some
    other file (the runtime's own: a fault of the server, answered 500).

    `files` maps each field to the client's path; a file inside a client's folder (resumeFrom's
    adapter_config.json) is that field's too.
    """
    failed = error.filename if isinstance(error.filename, str) else None
    if failed is None:
        return None
    failed_path = PurePath(failed)
    for field, given in files.items():
        if not given:
            continue
        given_path = PurePath(given)
        if failed_path == given_path or given_path in failed_path.parents:
            why = error.strerror or type(error).__name__
            return f"{field}: cannot read {failed}: {why}"
    return None
