"""`clora validate`: check manifests as the Kubernetes API server and the clora operator would.

For each LoRARuntime and LoRAExperiment, in the API server's order: unknown fields are pruned (and
reported here, since the API server drops them silently), defaults are applied, the object is checked
against the CRD's OpenAPI schema (jsonschema) and its CEL rules (cel-python), transition rules only
against an old version of the same object. Then the operator's checks: the models' own validators and,
when the referenced runtime is among the inputs, that it exists and that the rank fits its maxRank.

The problem-finding functions are pure (dicts in, problems out) so that the operator and `clora run`
reuse them: `check_object`, `check_reference`, `validate_manifests`. File handling is kept apart in
`load_paths` and `validate_paths`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from pydantic import BaseModel
from pydantic import ValidationError as ModelValidationError

from clora import cel
from clora.api import LoRAExperiment, LoRARuntime
from clora.constants import API_VERSION, EXPERIMENT_KIND, GROUP, RUNTIME_KIND
from clora.crdgen import openapi_schema

Severity = Literal["error", "warning"]

_MODELS: dict[str, type[BaseModel]] = {RUNTIME_KIND: LoRARuntime, EXPERIMENT_KIND: LoRAExperiment}

# Hostile YAML (issue 17): what one file may ask of the parser. A manifest needs few aliases, if any;
# a billion-laughs file needs many to grow exponentially. Kubernetes objects nest a few dozen levels at
# most; Python's recursion limit (about 1000) is what a deeper file would otherwise hit.
MAX_YAML_ALIASES = 100
"""Aliases (*name) per file at most."""
MAX_YAML_DEPTH = 100
"""Nesting levels of mappings and sequences per document at most."""
MAX_YAML_NODES = 1_000_000
"""Nodes per document at most, each alias counted as the whole node it repeats: a few aliases of
aliases (a billion laughs) expand exponentially."""


def _measure(root: yaml.Node) -> None:
    """Refuses a document whose aliases, expanded, exceed MAX_YAML_NODES or MAX_YAML_DEPTH (what every
    later walk of the value would meet); each shared node is measured once."""
    known: dict[int, tuple[int, int] | None] = {}  # id(node) -> (size, height); None while walked

    def walk(node: yaml.Node, depth: int) -> int:
        if id(node) in known:
            found = known[id(node)]
            if found is None:
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside the node it names (a cycle)", node.start_mark
                )
            size, height = found
        else:
            known[id(node)] = None
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            size, height = 1, 0
            for child in children:
                size = min(MAX_YAML_NODES + 1, size + walk(child, depth + 1))
                height = max(height, 1 + (known[id(child)] or (0, 0))[1])
            known[id(node)] = (size, height)
        if depth + height > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels (through aliases)", node.start_mark
            )
        if size > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"expands to more than {MAX_YAML_NODES} nodes (refused: an alias bomb?)",
                node.start_mark,
            )
        return size

    walk(root, 0)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses alias bombs, deep nesting and duplicate keys, each with a mark."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases (refused: an alias bomb?)", mark
                )
        if self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    mark = self.peek_event().start_mark
                    raise yaml.composer.ComposerError(
                        None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark
                    )
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def compose_document(self) -> Any:
        root = super().compose_document()  # type: ignore[no-untyped-call]
        if root is not None:
            _measure(root)
        return root

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (a later value would replace the earlier)",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class FieldProblem:
    """A problem with one field of one object."""

    path: str
    message: str
    severity: Severity = "error"


@dataclass(frozen=True)
class Problem:
    """A problem found in a file: one line `FILE: KIND/NAME: field.path: what is wrong`."""

    file: str
    kind: str
    name: str
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        parts = [self.file]
        if self.kind:
            parts.append(f"{self.kind}/{self.name}")
        if self.path:
            parts.append(self.path)
        parts.append(self.message if self.severity == "error" else f"warning: {self.message}")
        return ": ".join(parts)


@dataclass
class Manifest:
    """One YAML document: where it came from and its body."""

    file: str
    index: int  # 1-based document number within the file
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        kind = self.body.get("kind", "")
        return kind if isinstance(kind, str) else ""

    @property
    def metadata(self) -> dict[str, Any]:
        meta = self.body.get("metadata")
        return meta if isinstance(meta, dict) else {}

    @property
    def namespace(self) -> str:
        namespace = self.metadata.get("namespace")
        return namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE

    @property
    def name(self) -> str:
        name = self.metadata.get("name")
        return name if isinstance(name, str) else ""

    @property
    def display_name(self) -> str:
        """NAME, or NAMESPACE/NAME when the manifest sets a namespace; a placeholder when unnamed."""
        name = self.name or f"<document {self.index}>"
        namespace = self.metadata.get("namespace")
        return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def problem(self, fp: FieldProblem) -> Problem:
        return Problem(self.file, self.kind, self.display_name, fp.path, fp.message, fp.severity)


@dataclass
class Report:
    """What `validate` found: problems (errors and warnings), notes for -v, objects checked."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# -- paths ------------------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}[{key}]"  # map keys such as nvidia.com/gpu, as the API server writes them
    return f"{path}.{key}" if path else key


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "[")


# -- pruning and defaulting (the API server does both before validating) ------------------------------


def _is_untyped(schema: dict[str, Any]) -> bool:
    return "type" not in schema and (
        schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    )


def prune(value: Any, schema: dict[str, Any], path: str = "") -> tuple[Any, list[FieldProblem]]:
    """`value` without the fields its schema does not know (reported) and without nulls (the API
    server drops nulls of non-nullable fields before defaulting, silently)."""
    problems: list[FieldProblem] = []

    def walk(v: Any, s: dict[str, Any], p: str) -> Any:
        if _is_untyped(s):
            return v
        if isinstance(v, dict) and s.get("type") == "object":
            props = s.get("properties")
            extra = s.get("additionalProperties")
            out = {}
            for key, item in v.items():
                if item is None and not s.get("nullable"):
                    continue
                if props is not None and key in props:
                    out[key] = walk(item, props[key], _join(p, key))
                elif isinstance(extra, dict):
                    out[key] = walk(item, extra, _join(p, str(key)))
                elif props is None and extra is None:
                    out[key] = item  # a free-form object (metadata): the API server's business
                else:
                    hint = difflib.get_close_matches(str(key), list(props or ()), n=1)
                    guess = f'; did you mean "{hint[0]}"?' if hint else ""
                    problems.append(
                        FieldProblem(
                            _join(p, str(key)),
                            f"unknown field (the API server would drop it silently){guess}",
                        )
                    )
            return out
        if isinstance(v, list) and s.get("type") == "array" and isinstance(s.get("items"), dict):
            return [walk(item, s["items"], _join(p, i)) for i, item in enumerate(v)]
        return v

    return walk(value, schema, path), problems


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """A copy of `value` with the schema's defaults filled in, top-down as the API server does (so a
    `default: {}` object then gets the defaults of its own fields)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = dict(value)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        for key, item in out.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                out[key] = apply_defaults(item, sub)
        return out
    if isinstance(value, list) and schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


# -- the OpenAPI schema ------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    return f"{kind.get(type(value), type(value).__name__)} {json.dumps(value, default=str)[:60]}"


def _schema_message(error: ValidationError) -> tuple[str, str]:
    """(path suffix, message) of one jsonschema error, worded as the API server words it."""
    v, expected, instance = error.validator, error.validator_value, error.instance
    if v == "type":
        names = expected if isinstance(expected, str) else " or ".join(expected)
        hint = ""
        if expected == "array" and isinstance(instance, str):  # e.g. targetModules: all-linear
            hint = f" (a list: [{instance}])"
        return "", f"must be of type {names}{hint}, got {_describe(instance)}"
    if v == "enum":
        allowed = ", ".join(json.dumps(e) for e in expected)
        return "", f"must be one of {allowed}, got {json.dumps(instance, default=str)}"
    if v == "required":
        match = re.match(r"'(.+)' is a required property", error.message)
        return (match.group(1) if match else ""), "is required"
    if v == "minLength":
        return "", "must not be empty" if expected == 1 else f"must be at least {expected} characters long"
    if v == "maxLength":
        return "", f"must be at most {expected} characters long"
    if v == "pattern":
        return "", f"must match the pattern {expected}"
    if v == "anyOf" and all(isinstance(b, dict) and "type" in b for b in expected):
        kinds = " or ".join(
            f"an {b['type']}" if b["type"][0] in "aeiou" else f"a {b['type']}" for b in expected
        )
        return "", f"must be {kinds}, got {_describe(instance)}"
    return "", error.message


def schema_problems(value: Any, schema: dict[str, Any], path: str = "") -> list[FieldProblem]:
    """What the OpenAPI schema refuses in `value` (already pruned and defaulted)."""
    problems = []
    for error in sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path)):
        where = path
        for key in error.absolute_path:
            where = _join(where, key)
        suffix, message = _schema_message(error)
        if suffix:
            where = _join(where, suffix)
        problems.append(FieldProblem(where, message))
    return problems


# -- CEL rules ---------------------------------------------------------------------------------------


def _rule_path(path: str, field_path: str | None) -> str:
    if not field_path:
        return path
    for part in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']+)'\]|\[(\d+)\]", field_path):
        name, quoted, index = part
        path = _join(path, int(index)) if index else _join(path, name or quoted)
    return path


def cel_problems(
    value: Any,
    schema: dict[str, Any],
    old: Any = None,
    *,
    path: str = "",
    has_old: bool = False,
    bad_paths: Iterable[str] = (),
) -> list[FieldProblem]:
    """Evaluate every x-kubernetes-validations rule at its node, with `self` bound to the node's value.

    Transition rules (oldSelf) run only where an old value exists at the same path, as on an update.
    `bad_paths` are where the schema already refused something: a rule that fails to evaluate there
    (a value of the wrong type) is not reported a second time."""
    bad = list(bad_paths)
    problems: list[FieldProblem] = []

    def walk(v: Any, s: dict[str, Any], o: Any, p: str, correlated: bool) -> None:
        for rule in s.get("x-kubernetes-validations", ()):
            text = rule["rule"]
            if _is_transition(text) and not correlated:
                continue
            if p in bad:
                continue  # wrong type here: the schema said so already
            try:
                ok = cel.evaluate(text, v, s, o)
            except cel.UnsupportedRule as exc:
                problems.append(FieldProblem(p, f"rule not checked: {exc}", "warning"))
                continue
            except cel.RuleError as exc:
                if not any(_under(b, p) for b in bad):
                    problems.append(FieldProblem(p, f"rule {text!r} could not be evaluated: {exc}"))
                continue
            target = _rule_path(p, rule.get("fieldPath"))
            if not ok and target not in bad:  # a wrong type at its field: the schema said so already
                message = rule.get("message") or f"failed rule: {text}"
                problems.append(FieldProblem(target, message))
        if _is_untyped(s):
            return
        if isinstance(v, dict) and s.get("type") == "object":
            props = s.get("properties") or {}
            extra = s.get("additionalProperties")
            for key, item in v.items():
                sub = props.get(key, extra if isinstance(extra, dict) else None)
                if sub is None:
                    continue
                old_item_exists = correlated and isinstance(o, dict) and key in o
                walk(item, sub, o.get(key) if old_item_exists else None, _join(p, key), old_item_exists)
        elif isinstance(v, list) and s.get("type") == "array" and isinstance(s.get("items"), dict):
            # Items of atomic lists are not correlated with old items: no transition rules below.
            for i, item in enumerate(v):
                walk(item, s["items"], None, _join(p, i), False)

    walk(value, schema, old, path, has_old)
    return problems


def _is_transition(rule: str) -> bool:
    try:
        return cel.is_transition_rule(rule)
    except cel.UnsupportedRule:
        return re.search(r"\boldSelf\b", rule) is not None


# -- one object --------------------------------------------------------------------------------------


def _metadata_problems(body: dict[str, Any]) -> list[FieldProblem]:
    meta = body.get("metadata")
    if meta is None:
        return [FieldProblem("metadata", "is required (with at least a name)")]
    if not isinstance(meta, dict):
        return [FieldProblem("metadata", f"must be a mapping (with at least a name), got {_describe(meta)}")]
    problems = []
    for field_name in ("labels", "annotations"):
        value = meta.get(field_name)
        strings = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        if value is not None and not strings:
            problems.append(FieldProblem(f"metadata.{field_name}", "must be a mapping of strings to strings"))
    name = meta.get("name")
    if name is None or name == "":
        if not meta.get("generateName"):
            problems.append(FieldProblem("metadata.name", "is required"))
    elif not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        problems.append(
            FieldProblem(
                "metadata.name",
                "must be a lowercase RFC 1123 subdomain: lowercase letters, digits, '-' and '.', "
                "starting and ending with a letter or digit, at most 253 characters",
            )
        )
    namespace = meta.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace)
    ):
        problems.append(
            FieldProblem("metadata.namespace", "must be a lowercase RFC 1123 label (at most 63 characters)")
        )
    return problems


def prepare(body: dict[str, Any]) -> tuple[dict[str, Any], list[FieldProblem]]:
    """The object as the API server would store it: status dropped (the status subresource ignores
    it on create and update), unknown fields pruned (reported), defaults applied."""
    schema = openapi_schema(body["kind"])
    body = {k: v for k, v in body.items() if k != "status"}
    pruned, problems = prune(body, schema)
    return apply_defaults(pruned, schema), problems


def _model_problems(kind: str, body: dict[str, Any]) -> list[FieldProblem]:
    """What the operator's parse (the Pydantic models) refuses beyond the CRD's schema."""
    try:
        _MODELS[kind].model_validate(body)
    except ModelValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ""
            for key in err["loc"]:
                where = _join(where, key)
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(FieldProblem(where, message))
        return problems
    return []


def check_object(body: dict[str, Any], old: dict[str, Any] | None = None) -> list[FieldProblem]:
    """Every problem the API server (and the operator, on its own) finds in one LoRARuntime or
    LoRAExperiment. `old`: the version it replaces, for transition rules (immutable fields)."""
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in _MODELS:
        return [FieldProblem("kind", f"must be {RUNTIME_KIND} or {EXPERIMENT_KIND}")]
    problems = []
    api_version = body.get("apiVersion")
    if api_version is None:
        problems.append(FieldProblem("apiVersion", f"is required ({API_VERSION})"))
    elif api_version != API_VERSION:
        problems.append(FieldProblem("apiVersion", f"must be {API_VERSION}, got {api_version!r}"))
    problems += _metadata_problems(body)
    schema = openapi_schema(kind)
    value, pruned = prepare(body)
    problems += pruned
    found_by_schema = schema_problems(value, schema)
    if not isinstance(body.get("metadata"), dict):  # said once above, not again by the schema
        found_by_schema = [p for p in found_by_schema if p.path != "metadata"]
    problems += found_by_schema
    old_value = prepare(old)[0] if old is not None else None
    problems += cel_problems(
        value,
        schema,
        old_value,
        has_old=old_value is not None,
        bad_paths=[p.path for p in found_by_schema],
    )
    if not any(p.severity == "error" for p in problems):
        problems += _model_problems(kind, value)
    return _unique(problems)


def check_reference(experiment: dict[str, Any], runtime: dict[str, Any] | None) -> list[FieldProblem]:
    """The operator's cross-object checks of a (prepared: defaulted) experiment against its prepared
    runtime: the rank fits maxRank, the sampling budget fits tokensPerTick. `runtime` None: it is not
    known here (a warning: it may exist in the cluster)."""
    spec = experiment.get("spec") if isinstance(experiment.get("spec"), dict) else {}
    ref = spec.get("runtime")
    if not isinstance(ref, str) or not ref:
        return []
    if runtime is None:
        namespace = (experiment.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE
        return [
            FieldProblem(
                "spec.runtime",
                f"LoRARuntime {ref!r} is not among the inputs; it must exist in namespace {namespace!r}",
                "warning",
            )
        ]
    lora = spec.get("lora") if isinstance(spec.get("lora"), dict) else {}
    training = spec.get("training") if isinstance(spec.get("training"), dict) else {}
    capacity = (runtime.get("spec") or {}).get("capacity") or {}
    problems = []
    rank, max_rank = lora.get("rank"), capacity.get("maxRank")
    if isinstance(rank, int) and isinstance(max_rank, int) and rank > max_rank:
        message = f"rank {rank} is above maxRank {max_rank} of LoRARuntime {ref!r}"
        problems.append(FieldProblem("spec.lora.rank", message))
    # The operator packs an experiment by its sampling budget; one above a pod's whole budget never fits.
    sizes = [training.get(k) for k in ("promptsPerStep", "groupSize", "maxNewTokens")]
    budget = capacity.get("tokensPerTick")
    if all(isinstance(n, int) for n in sizes) and isinstance(budget, int):
        tokens = sizes[0] * sizes[1] * sizes[2]
        if tokens > budget:
            message = (
                f"promptsPerStep x groupSize x maxNewTokens = {tokens} is above tokensPerTick {budget}"
                f" of LoRARuntime {ref!r}"
            )
            problems.append(FieldProblem("spec.training", message))
    return problems


def _unique(problems: list[FieldProblem]) -> list[FieldProblem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


# -- many objects ------------------------------------------------------------------------------------


def _is_ours(body: dict[str, Any]) -> bool:
    """Whether the API server would hand this object to clora's CRDs (a clora.dev kind, or one of
    clora's kinds that lacks its apiVersion)."""
    api_version = body.get("apiVersion")
    if not isinstance(api_version, str):
        kind = body.get("kind")
        return isinstance(kind, str) and kind in _MODELS
    return api_version.split("/")[0] == GROUP and "/" in api_version


def validate_manifests(manifests: Sequence[Manifest], old: Sequence[Manifest] = ()) -> Report:
    """Check every LoRARuntime/LoRAExperiment among `manifests`; `old`: earlier versions of some of
    them (matched by kind, namespace and name) for the transition rules. Problems come in input order."""
    report = Report()
    old_by_key = {m.key: m.body for m in old if _is_ours(m.body) and m.kind in _MODELS}
    first_seen: dict[tuple[str, str, str], Manifest] = {}
    found: list[list[Problem]] = [[] for _ in manifests]
    ours: list[int] = []
    for i, m in enumerate(manifests):
        if not _is_ours(m.body):
            report.notes.append(f"{m.file}: document {m.index}: skipped {m.kind or 'an object without kind'}")
            continue
        if m.kind not in _MODELS:
            known = f"{RUNTIME_KIND}, {EXPERIMENT_KIND}"
            found[i].append(m.problem(FieldProblem("kind", f"{GROUP} has no kind {m.kind!r} ({known})")))
            continue
        ours.append(i)
        report.checked += 1
        found[i] += [m.problem(fp) for fp in check_object(m.body, old_by_key.get(m.key))]
        if m.name and m.key in first_seen:
            first = first_seen[m.key]
            where = f"also in {first.file}, document {first.index}"
            duplicate = FieldProblem("metadata.name", f"duplicate {m.kind} {m.namespace}/{m.name} ({where})")
            found[i].append(m.problem(duplicate))
        first_seen.setdefault(m.key, m)

    runtimes = {}
    for i in ours:
        m = manifests[i]
        if m.kind == RUNTIME_KIND and m.name:
            runtimes.setdefault((m.namespace, m.name), prepare(m.body)[0])
    for i in ours:
        m = manifests[i]
        if m.kind != EXPERIMENT_KIND:
            continue
        experiment = prepare(m.body)[0]
        spec = experiment.get("spec")
        ref = spec.get("runtime") if isinstance(spec, dict) else None
        if isinstance(ref, str):
            found[i] += [
                m.problem(fp) for fp in check_reference(experiment, runtimes.get((m.namespace, ref)))
            ]
    report.problems = [p for problems in found for p in problems]
    return report


# -- files -------------------------------------------------------------------------------------------


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[str], list[Problem]]:
    """Files to read: files as given, directories searched for *.yaml and *.yml (sorted)."""
    files: list[str] = []
    problems: list[Problem] = []
    for raw in paths:
        if str(raw) == "-":
            files.append("-")
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
            if not found:
                problems.append(Problem(str(path), "", "", "", "no *.yaml or *.yml files in this directory"))
            files += [str(p) for p in found]
        elif path.is_file():
            files.append(str(path))
        else:
            problems.append(Problem(str(path), "", "", "", "no such file or directory"))
    return files, problems


def parse_documents(text: str, file: str) -> tuple[list[Manifest], list[Problem]]:
    """The YAML documents of one file's text; malformed YAML is one problem, never a traceback."""
    try:
        docs = list(yaml.load_all(text, Loader=_BoundedLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return [], [Problem(file, "", "", "", f"malformed YAML{where}: {what}")]
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            what = f"document {index} is not a Kubernetes object (a mapping): {_describe(doc)}"
            problems.append(Problem(file, "", "", "", what))
            continue
        manifests.append(Manifest(file, index, doc))
    if not manifests and not problems:
        problems.append(Problem(file, "", "", "", "empty file: no YAML documents"))
    return manifests, problems


def load_paths(paths: Iterable[str | Path]) -> tuple[list[Manifest], list[Problem]]:
    """Every document of every file under `paths`, with the problems of reading them."""
    files, problems = expand_paths(paths)
    manifests: list[Manifest] = []
    for file in files:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(file, "", "", "", "not a text file (not UTF-8): not YAML"))
            continue
        except OSError as exc:
            problems.append(Problem(file, "", "", "", f"cannot read: {exc.strerror or exc}"))
            continue
        found, bad = parse_documents(text, "<stdin>" if file == "-" else file)
        manifests += found
        problems += bad
    return manifests, problems


def validate(paths: Iterable[str | Path], old_paths: Iterable[str | Path] = ()) -> Report:
    """Load and check; the problems of reading files come first."""
    manifests, problems = load_paths(paths)
    old, old_problems = load_paths(old_paths) if old_paths else ([], [])
    report = validate_manifests(manifests, old)
    report.problems = problems + old_problems + report.problems
    return report


def validate_paths(paths: Iterable[str | Path], old_paths: Iterable[str | Path] = ()) -> list[Problem]:
    """Every problem (errors and warnings) in the manifests under `paths`."""
    return validate(paths, old_paths).problems


# -- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE_OR_DIR",
        help="a manifest file, a directory (searched for *.yaml, *.yml) or - for stdin; repeatable",
    )
    parser.add_argument(
        "--old",
        action="append",
        default=[],
        metavar="FILE_OR_DIR",
        help="the objects as they are now, to check an update against (immutable fields); repeatable",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also say what was skipped")


def main(args: argparse.Namespace) -> int:
    report = validate(args.filename, args.old)
    for problem in report.problems:
        print(problem)
    if args.verbose:
        for note in report.notes:
            print(note, file=sys.stderr)
    errors, warnings = len(report.errors), len(report.problems) - len(report.errors)
    if args.verbose or errors:
        print(
            f"{report.checked} objects checked: {errors} errors, {warnings} warnings",
            file=sys.stderr,
        )
    return 1 if errors else 0
