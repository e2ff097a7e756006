"""The Grafana dashboard (charts/clora/dashboards/clora.json) queries exactly the metrics clora exports:
every series it asks for exists in clora/metrics.py, with the suffix its type gives it, and every metric
there (and every name DESIGN.md spells out) appears in some panel. PromQL is parsed for real."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from tools import CHART_DIR, REPO_ROOT

from clora.metrics import OPERATOR_METRICS, RUNTIME_METRICS, OperatorMetrics, RuntimeMetrics

DASHBOARD = CHART_DIR / "dashboards" / "clora.json"
# DESIGN.md lies in shared/ beside the repository (in CI too).
DESIGN_MD = REPO_ROOT.parent / "shared" / "DESIGN.md"
# Grafana expands these before Prometheus sees the query; any valid value will do for parsing.
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _metric_types() -> dict[str, str]:
    """Base metric name -> prometheus type, from the registries clora really builds."""
    types: dict[str, str] = {}
    for metrics in (RuntimeMetrics.create(), OperatorMetrics.create()):
        for family in metrics.registry.collect():
            types[family.name] = family.type
    return types


def _series_names(types: dict[str, str]) -> dict[str, str]:
    """Every series name Prometheus stores for those metrics -> its base metric."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {base + suffix: base for base, kind in types.items() for suffix in suffixes[kind]}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"variable {var['name']}: expected label_values(<selector>, <label>), got {query}"
            yield f"variable {var['name']!r}", inner.group(1)


def _parse(expr: str) -> Any:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(expr)


def _selectors(node: Any, context: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(metric name, names of the functions/aggregations around it, innermost last) for every selector."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node.name, context
        return
    if isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _selectors(arg, (*context, node.func.name))
        return
    if isinstance(node, promql_parser.AggregateExpr):
        yield from _selectors(node.expr, (*context, f"{node.op}".lower()))
        return
    for attr in ("lhs", "rhs", "expr", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from _selectors(child, context)


def _used_series() -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (where, name, context)
        for where, expr in _queries(_dashboard())
        for name, context in _selectors(_parse(expr))
    ]


def test_every_query_parses_as_promql() -> None:
    for where, expr in _queries(_dashboard()):
        try:
            _parse(expr)
        except Exception as exc:  # promql_parser raises plain exceptions with the position
            pytest.fail(f"{where}: {expr!r} is not valid PromQL: {exc}")


def test_every_queried_metric_exists_in_clora() -> None:
    series = _series_names(_metric_types())
    unknown = sorted({(where, name) for where, name, _ in _used_series() if name not in series})
    assert not unknown, f"the dashboard queries metrics clora does not export: {unknown}"


def test_every_clora_metric_appears_in_a_panel() -> None:
    types = _metric_types()
    assert set(types) == set(RUNTIME_METRICS) | set(
        OPERATOR_METRICS
    )  # the documented names are the real ones
    series = _series_names(types)
    shown = {
        series[name] for where, name, _ in _used_series() if where.startswith("panel") and name in series
    }
    assert not set(types) - shown, f"metrics no panel shows: {sorted(set(types) - shown)}"


def test_every_design_md_metric_appears_in_a_panel() -> None:
    if not DESIGN_MD.is_file():
        pytest.skip(f"{DESIGN_MD} not found (shared/ lies beside the repository in CI)")
    named = set(re.findall(r"`(clora_[a-z0-9_]+)`", DESIGN_MD.read_text()))
    assert named, "DESIGN.md names no clora_ metric: the pattern above no longer matches it"
    shown = {name for _, name, _ in _used_series()}
    assert not named - shown, f"DESIGN.md metrics no panel shows: {sorted(named - shown)}"


def test_counters_and_histograms_are_queried_as_such() -> None:
    """A counter only means something as a rate; a histogram's buckets only through histogram_quantile
    (grouped by le), its _sum/_count only as rates."""
    types = _metric_types()
    series = _series_names(types)
    dashboard = _dashboard()
    for where, expr in _queries(dashboard):
        for name, context in _selectors(_parse(expr)):
            kind = types.get(series.get(name, ""), "")
            if kind == "counter" or (kind == "histogram" and not name.endswith("_bucket")):
                assert context and context[-1] in ("rate", "increase", "irate"), (
                    f"{where}: {name} outside a rate"
                )
            if kind == "histogram" and name.endswith("_bucket"):
                assert "histogram_quantile" in context, f"{where}: {name} outside histogram_quantile"
                assert re.search(r"by \(le\b|by \([^)]*\ble\b", expr), f"{where}: {name} not grouped by le"


def test_required_panels_and_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "runtime", "experiment"} <= set(variables)
    titles = " | ".join(p["title"].lower() for p in _panels(dashboard))
    for words in (
        "reward",
        "step",
        "by phase",
        "queue",
        "admission wait",
        "slots",
        "tick duration",
        "tokens per second",
        "checkpoint duration",
        "reconcile errors",
    ):
        assert words in titles, f"no panel about {words!r} in: {titles}"

    # Per-experiment panels follow all three variables; runtime panels follow namespace and runtime.
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            if "clora_experiment_" in target["expr"]:
                assert all(f"${v}" in target["expr"] for v in ("namespace", "runtime", "experiment")), target
            if any(
                m in target["expr"] for m in ("clora_tick_", "clora_tokens_", "clora_free_", "clora_active_")
            ):
                assert all(f"${v}" in target["expr"] for v in ("namespace", "runtime")), target


def test_dashboard_is_importable_on_its_own() -> None:
    """One Grafana JSON model: a datasource variable instead of a fixed UID, unique panel ids, a grid
    that fits, so it imports into any Grafana (UI import or the sidecar)."""
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel.get("description"), f"panel {panel['title']!r} says nothing about what it shows"
    assert "${datasource}" not in json.dumps(dashboard["templating"]["list"][0])  # the variable itself
