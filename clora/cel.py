"""CEL rules (x-kubernetes-validations) evaluated as the Kubernetes API server would, with cel-python.

Two things differ from plain cel-python and are handled here:
- values are typed by their schema node, as the API server types them: `type: number` is a double
  even when the YAML says `1`, `format: date-time` strings are timestamps;
- the API server adds extension libraries (lists, strings, regex). The common functions of those are
  implemented below; a rule that calls one that is not (quantity, url, ip, semver, optionals, ...)
  raises `UnsupportedRule` naming it, so a caller can say that the rule was not checked instead of
  passing it silently.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import celpy
from celpy import celtypes

# cel-python's own functions and macros, and the Kubernetes extensions implemented below.
_BUILTIN_FUNCTIONS = frozenset(
    {
        "has", "size", "type", "int", "uint", "double", "string", "bytes", "bool", "dyn", "duration",
        "timestamp", "matches", "contains", "startsWith", "endsWith", "all", "exists", "exists_one",
        "map", "filter", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getFullYear",
        "getMonth", "getHours", "getMilliseconds", "getMinutes", "getSeconds",
    }
)  # fmt: skip


class UnsupportedRule(Exception):
    """The rule uses CEL that cel-python (with clora's extensions) cannot evaluate."""


class RuleError(Exception):
    """Evaluating the rule failed (e.g. no matching overload: a value of the wrong type)."""


# -- Kubernetes CEL extension functions (k8s.io/apiserver/pkg/cel/library, cel-go ext strings) ----


def _is_sorted(items: celtypes.ListType) -> celtypes.BoolType:
    values = list(items)
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(values)))


def _sum(items: celtypes.ListType) -> Any:
    values = list(items)
    if not values:
        return celtypes.IntType(0)
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _min(items: celtypes.ListType) -> Any:
    if not items:
        raise ValueError("min called on an empty list")
    return min(items)


def _max(items: celtypes.ListType) -> Any:
    if not items:
        raise ValueError("max called on an empty list")
    return max(items)


def _index_of(target: Any, value: Any, *rest: Any) -> celtypes.IntType:
    if isinstance(target, str):
        start = int(rest[0]) if rest else 0
        return celtypes.IntType(target.find(str(value), start))
    values = list(target)
    return celtypes.IntType(values.index(value) if value in values else -1)


def _last_index_of(target: Any, value: Any) -> celtypes.IntType:
    if isinstance(target, str):
        return celtypes.IntType(target.rfind(str(value)))
    values = list(target)
    return celtypes.IntType(len(values) - 1 - values[::-1].index(value) if value in values else -1)


def _split(text: celtypes.StringType, sep: celtypes.StringType, *limit: Any) -> celtypes.ListType:
    parts = str(text).split(str(sep)) if not limit else str(text).split(str(sep), max(int(limit[0]) - 1, 0))
    return celtypes.ListType([celtypes.StringType(p) for p in parts])


def _join(items: celtypes.ListType, *sep: Any) -> celtypes.StringType:
    return celtypes.StringType((str(sep[0]) if sep else "").join(str(i) for i in items))


def _substring(text: celtypes.StringType, start: Any, *end: Any) -> celtypes.StringType:
    return celtypes.StringType(str(text)[int(start) : int(end[0]) if end else None])


def _replace(text: celtypes.StringType, old: Any, new: Any, *count: Any) -> celtypes.StringType:
    n = int(count[0]) if count else -1
    return celtypes.StringType(str(text).replace(str(old), str(new), n))


def _find(text: celtypes.StringType, pattern: celtypes.StringType) -> celtypes.StringType:
    match = re.search(str(pattern), str(text))
    return celtypes.StringType(match.group(0) if match else "")


def _find_all(text: celtypes.StringType, pattern: celtypes.StringType, *limit: Any) -> celtypes.ListType:
    found = [m.group(0) for m in re.finditer(str(pattern), str(text))]
    if limit and int(limit[0]) >= 0:
        found = found[: int(limit[0])]
    return celtypes.ListType([celtypes.StringType(f) for f in found])


def _equal(a: Any, b: Any) -> bool:
    """CEL's heterogeneous equality (as cel-go has it): values of different kinds are unequal rather
    than an error; numbers compare by value; lists and maps compare element-wise."""
    numbers = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return float(a) == float(b)
    if isinstance(a, celtypes.MapType) and isinstance(b, celtypes.MapType):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, celtypes.ListType) and isinstance(b, celtypes.ListType):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, celtypes.BoolType) != isinstance(b, celtypes.BoolType):
        return False
    if type(a) is not type(b) and not (a is None or b is None):
        return False
    return bool(a == b)


KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "_==_": lambda a, b: celtypes.BoolType(_equal(a, b)),
    "_!=_": lambda a, b: celtypes.BoolType(not _equal(a, b)),
    "isSorted": _is_sorted,
    "sum": _sum,
    "min": _min,
    "max": _max,
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
    "lowerAscii": lambda s: celtypes.StringType(str(s).lower()),
    "upperAscii": lambda s: celtypes.StringType(str(s).upper()),
    "trim": lambda s: celtypes.StringType(str(s).strip()),
    "charAt": lambda s, i: celtypes.StringType(str(s)[int(i) : int(i) + 1]),
    "split": _split,
    "join": _join,
    "substring": _substring,
    "replace": _replace,
    "find": _find,
    "findAll": _find_all,
}

_KNOWN_FUNCTIONS = _BUILTIN_FUNCTIONS | frozenset(KUBERNETES_FUNCTIONS)
_ENV = celpy.Environment()


@dataclass(frozen=True)
class CompiledRule:
    """A rule parsed once: its program and whether it is a transition rule (uses oldSelf)."""

    text: str
    program: Any
    uses_old_self: bool


def _called_functions(ast: Any) -> set[str]:
    names = set()
    for tree in ast.iter_subtrees():
        if tree.data in ("member_dot_arg", "ident_arg"):
            names.update(str(c) for c in tree.children if getattr(c, "type", None) == "IDENT")
    return names


def _references_old_self(ast: Any) -> bool:
    return any(
        getattr(token, "type", None) == "IDENT" and str(token) == "oldSelf"
        for token in ast.scan_values(lambda _: True)
    )


@functools.cache
def compile_rule(text: str) -> CompiledRule:
    """Parse a rule; raises UnsupportedRule when cel-python cannot evaluate it."""
    try:
        ast = _ENV.compile(text)
    except celpy.CELParseError as exc:
        raise UnsupportedRule(f"cel-python cannot parse the rule {text!r}: {exc.args[0]}") from None
    unknown = sorted(_called_functions(ast) - _KNOWN_FUNCTIONS)
    if unknown:
        raise UnsupportedRule(
            f"the rule {text!r} calls {', '.join(unknown)}, which clora validate cannot evaluate"
        )
    program = _ENV.program(ast, functions=KUBERNETES_FUNCTIONS)
    return CompiledRule(text=text, program=program, uses_old_self=_references_old_self(ast))


def to_cel(value: Any, schema: dict[str, Any] | None) -> Any:
    """A JSON value as the CEL value the API server would bind, typed by its schema node."""
    schema = schema or {}
    schema_type = schema.get("type")
    if value is None:
        return None
    if schema_type == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    if schema_type == "string" and schema.get("format") == "date-time" and isinstance(value, str):
        try:
            return celtypes.TimestampType(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return celtypes.StringType(value)
    if schema_type == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(v, props.get(k, extra if isinstance(extra, dict) else None))
                for k, v in value.items()
            }
        )
    if schema_type == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items")) for v in value])
    return celpy.json_to_cel(value)


def evaluate(rule: str, self_value: Any, schema: dict[str, Any] | None = None, old_value: Any = None) -> bool:
    """Evaluate a rule with `self` (and `oldSelf` for transition rules) bound.

    Raises UnsupportedRule (the rule cannot be evaluated here) or RuleError (evaluation failed)."""
    compiled = compile_rule(rule)
    activation = {"self": to_cel(self_value, schema)}
    if compiled.uses_old_self:
        activation["oldSelf"] = to_cel(old_value, schema)
    try:
        result = compiled.program.evaluate(activation)
    except celpy.CELEvalError as exc:
        raise RuleError(str(exc.args[0]) if exc.args else str(exc)) from None
    if isinstance(result, celpy.CELEvalError):
        raise RuleError(str(result.args[0]) if result.args else str(result))
    if not isinstance(result, celtypes.BoolType | bool):
        raise RuleError(f"the rule returned {type(result).__name__}, not a bool")
    return bool(result)


def is_transition_rule(rule: str) -> bool:
    """Whether the rule compares with oldSelf (it runs only on update)."""
    return compile_rule(rule).uses_old_self
