"""The Helm chart, driven with the real helm and kubectl: lint, render, validate every object, compare the
operator's RBAC with the calls it makes, dry-run the chart and the examples through kubectl, and keep the
chart's CRDs equal to crds/."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from tools import (
    CHART_DIR,
    CRDS_DIR,
    EXAMPLES_DIR,
    REPO_ROOT,
    helm_template,
    kube_emulator,
    kubectl,
    load_docs,
    missing,
    repo_crds,
    run,
    tool,
)

from clora.constants import API_VERSION, CATEGORY, EXPERIMENT_KIND, RUNTIME_KIND
from clora.validation import check_object, check_reference

CI_VALUES = CHART_DIR / "ci-values.yaml"
INSTALL_DOC = REPO_ROOT / "docs" / "install.md"
PROMETHEUS_API = "monitoring.coreos.com/v1"
# Every Kubernetes minor the chart supports (Chart.yaml: kubeVersion >=1.30) that kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Not ours and not built in: kopf's peering CRDs ship beside our copies in charts/clora/crds/.
KOPF_PEERING_CRDS = "kopf-peering.yaml"
RENDERINGS = {
    "default": ([], []),
    "ci-values": ([CI_VALUES], [PROMETHEUS_API]),
}


@pytest.fixture(scope="module", params=list(RENDERINGS))
def rendering(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    values, apis = RENDERINGS[request.param]
    return request.param, load_docs(helm_template(values, apis))


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return load_docs(helm_template())


@pytest.fixture(scope="module")
def ci_objects() -> list[dict[str, Any]]:
    return load_docs(helm_template([CI_VALUES], [PROMETHEUS_API]))


def find(objects: list[dict[str, Any]], kind: str, name_part: str = "") -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name_part in o["metadata"]["name"]]


def one(objects: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    found = find(objects, kind, name_part)
    assert len(found) == 1, (
        f"expected one {kind} named *{name_part}*, got {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", "operator")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"
    ]
    return container


# ---- Chart metadata -------------------------------------------------------------------------------


def test_app_version_is_the_package_version() -> None:
    package = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == package
    assert chart["kubeVersion"].startswith(">=1.30")


def test_every_value_has_a_comment() -> None:
    """values.yaml documents every key on the line just above it. Keys inside a documented map default
    (e.g. resources.requests.cpu) are that value's example, not values of their own."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    example_maps = {
        "resources",
        "podSecurityContext",
        "securityContext",
        "livenessProbe",
        "readinessProbe",
        "capacity",
        "selector",
    }
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not key or (i and lines[i - 1].strip().startswith("#")):
            continue
        if not example_maps & set(_ancestors(lines, i)):
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert not undocumented, "values without a comment just above them:\n" + "\n".join(undocumented)


def _ancestors(lines: list[str], index: int) -> list[str]:
    """The keys that enclose lines[index], by indentation."""
    out, indent = [], len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        line_indent = len(line) - len(line.lstrip())
        if line_indent < indent:
            out.append(stripped.split(":", 1)[0])
            indent = line_indent
    return out


# ---- helm lint and the rendered objects ----------------------------------------------------------------


@pytest.mark.parametrize("values", [None, CI_VALUES], ids=["default", "ci-values"])
def test_helm_lint_is_clean(values: Path | None) -> None:
    args: list[str | Path] = [tool("helm"), "lint", "--strict", CHART_DIR]
    if values:
        args += ["--values", values]
    out = run(args).stdout
    findings = [line for line in out.splitlines() if re.match(r"\[(INFO|WARNING|ERROR)\]", line.strip())]
    assert not findings, out
    assert "0 chart(s) failed" in out


def test_rendered_objects_validate(rendering: tuple[str, list[dict[str, Any]]]) -> None:
    """Built-in kinds against Kubernetes' own schemas (strict: unknown fields fail); our kinds against
    their CRD; the Prometheus operator's kinds are not in any schema we have, so only their shape."""
    name, objects = rendering
    crds = {(crd["spec"]["group"], crd["spec"]["names"]["kind"]): crd for crd in _chart_crds()}
    checked: dict[str, int] = {"builtin": 0, "crd": 0, "prometheus-operator": 0}
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if (group, obj["kind"]) in crds:
            _validate_against_crd(obj, crds[(group, obj["kind"])])
            if group == API_VERSION.partition("/")[0]:
                # Ours: also the CEL rules and the operator's own checks, as `clora validate` runs them.
                assert not check_object(obj), check_object(obj)
            checked["crd"] += 1
        elif group == "monitoring.coreos.com":
            # Explicitly not schema-checked (the CRDs belong to the Prometheus operator): shape only.
            spec = obj["spec"]
            assert spec["selector"]["matchLabels"], obj
            endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints")
            assert endpoints and all(e["port"] and e["path"] == "/metrics" for e in endpoints), obj
            checked["prometheus-operator"] += 1
        else:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(
                        f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}"
                    )
            checked["builtin"] += 1
    assert checked["builtin"] >= 7, checked
    if name == "ci-values":
        assert checked["crd"] >= 2 and checked["prometheus-operator"] == 2, checked


def _chart_crds() -> list[dict[str, Any]]:
    return [
        doc for path in sorted((CHART_DIR / "crds").glob("*.yaml")) for doc in load_docs(path.read_text())
    ]


def _validate_against_crd(obj: dict[str, Any], crd: dict[str, Any]) -> None:
    version = obj["apiVersion"].rpartition("/")[2]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{crd['metadata']['name']} does not serve {version}"
    schema = served["schema"]["openAPIV3Schema"]
    # OpenAPI v3 schemas are JSON Schema draft 4 plus x-kubernetes-* keywords, which a validator ignores.
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    _assert_no_unknown_fields(obj.get("spec", {}), schema.get("properties", {}).get("spec", {}), "spec")


def _assert_no_unknown_fields(value: Any, schema: dict[str, Any], where: str) -> None:
    """The API server prunes unknown fields: a chart value that lands in one would be silently lost."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(value, dict):
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                _assert_no_unknown_fields(item, schema["items"], f"{where}[{i}]")
        return
    properties = schema.get("properties")
    if properties is None:
        return  # a map (additionalProperties) or int-or-string: any key goes
    unknown = set(value) - set(properties)
    assert not unknown, f"{where}: fields {sorted(unknown)} are not in the CRD and would be pruned"
    for key, item in value.items():
        _assert_no_unknown_fields(item, properties[key], f"{where}.{key}")


def test_prometheus_operator_objects_need_its_api() -> None:
    """`helm install` must not fail on a cluster without the Prometheus operator: the ServiceMonitor and
    PodMonitor render only when monitoring.coreos.com/v1 is served, even when enabled."""
    without = load_docs(helm_template([CI_VALUES]))
    assert not [o for o in without if o["apiVersion"].startswith("monitoring.coreos.com/")]
    with_api = load_docs(helm_template([CI_VALUES], [PROMETHEUS_API]))
    assert {o["kind"] for o in with_api if o["apiVersion"] == PROMETHEUS_API} == {
        "ServiceMonitor",
        "PodMonitor",
    }


def test_install_dry_run_without_prometheus_operator(tmp_path: Path) -> None:
    """`helm install --dry-run=client` (no cluster, so no monitoring.coreos.com/v1) goes through with every
    optional part on, and NOTES says the ServiceMonitor/PodMonitor were skipped and how to get them."""
    args: list[str | Path] = [
        tool("helm"),
        "install",
        "clora",
        CHART_DIR,
        "--namespace",
        "clora-system",
        "--dry-run=client",
        "--values",
        CI_VALUES,
    ]
    out = run(
        args, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    ).stdout
    notes = out[out.index("NOTES:") :]
    assert "kubectl get lx -w" in notes and "deployment/clora-operator" in notes
    assert "they were skipped" in notes and "kind: ServiceMonitor" not in out
    assert "kind: ConfigMap" in out and "kind: LoRARuntime" in out


def test_default_values_create_no_optional_parts(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )


def test_operator_deployment(default_objects: list[dict[str, Any]]) -> None:
    deployment = one(default_objects, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(default_objects)
    assert deployment["spec"]["replicas"] == 2
    assert container["args"][0] == "operator"

    # Probes ask kopf's liveness endpoint, on the port the operator is told to serve it on.
    health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert f"--liveness-port={health}" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}

    # More than one replica: kopf peering through the ClusterKopfPeering the chart creates.
    peering = one(default_objects, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["CLORA_RUNTIME_IMAGE"]["value"] == container["image"] == "clora:0.1.0-cpu"

    # Hardening: non-root, nothing writable but /tmp, no privileges.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # The metrics Service reaches the port the operator is told to serve metrics on.
    service = one(default_objects, "Service", "metrics")
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert f"--metrics-port={metrics_port}" in container["args"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_standalone_without_peering() -> None:
    objects = load_docs(
        helm_template([_values_file({"operator": {"replicas": 1, "peering": {"enabled": False}}})])
    )
    args = operator_container(objects)["args"]
    assert "--standalone" in args and not [a for a in args if a.startswith("--peering")]
    assert not find(objects, "ClusterKopfPeering") and not find(objects, "PodDisruptionBudget")


def test_namespaced_operator_peers_in_each_namespace(ci_objects: list[dict[str, Any]]) -> None:
    """kopf limited to namespaces peers through a KopfPeering in each; patterns cannot get one."""
    args = operator_container(ci_objects)["args"]
    namespaces = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
    peerings = find(ci_objects, "KopfPeering")
    assert namespaces and sorted(p["metadata"]["namespace"] for p in peerings) == sorted(namespaces)
    assert {f"--peering={p['metadata']['name']}" for p in peerings} <= set(args)
    assert not find(ci_objects, "ClusterKopfPeering")
    proc = run(
        [tool("helm"), "template", "clora", CHART_DIR, "--set", "operator.namespaces={ml-*}"], check=False
    )
    assert proc.returncode != 0 and "peering.enabled=false" in proc.stderr


def _values_file(values: dict[str, Any]) -> Path:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    return Path(f.name)


def test_operator_args_are_accepted_by_clora_operator(ci_objects: list[dict[str, Any]]) -> None:
    """Every flag the chart passes exists in `clora operator` (a renamed flag would crash-loop the pod)."""
    try:
        module = importlib.import_module("clora_operator.main")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("clora_operator"):
            missing("clora_operator.main does not exist yet")
        raise
    for objects in (
        ci_objects,
        load_docs(helm_template([_values_file({"operator": {"peering": {"enabled": False}}})])),
    ):
        args = operator_container(objects)["args"]
        parser = argparse.ArgumentParser(prog="clora operator", exit_on_error=False)
        module.add_arguments(parser)
        try:
            parser.parse_args(args[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"`clora {' '.join(args)}` is refused by clora_operator.main: {exc}")


def test_pod_monitor_finds_the_runtime_pods_the_operator_builds(ci_objects: list[dict[str, Any]]) -> None:
    """The PodMonitor's selector, port name and `runtime` relabeling match the pods the operator creates
    (built here by the operator's own pod builder from the chart's default LoRARuntime)."""
    try:
        pods = importlib.import_module("clora_operator.pods")
    except ModuleNotFoundError as exc:
        if not (exc.name and exc.name.startswith("clora_operator")):
            raise
        missing("clora_operator.pods does not exist yet")
    from clora.api import LoRARuntime

    body = one(ci_objects, RUNTIME_KIND)
    body["metadata"]["uid"] = "0000"
    pod = pods.build_runtime_pod(LoRARuntime.model_validate(body), "node-a", image="clora:0.1.0-cuda")
    monitor = one(ci_objects, "PodMonitor")
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = [p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert endpoint["port"] in ports
    # Prometheus turns a pod label into __meta_kubernetes_pod_label_<name, non-alphanumerics as _>.
    runtime_relabel = [r for r in endpoint["relabelings"] if r["targetLabel"] == "runtime"]
    (source,) = runtime_relabel[0]["sourceLabels"]
    matching = [k for k in labels if source == "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k)]
    assert matching and labels[matching[0]] == body["metadata"]["name"]


def test_dashboard_configmap_is_the_dashboard_file(ci_objects: list[dict[str, Any]]) -> None:
    configmap = one(ci_objects, "ConfigMap", "dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["clora.json"])
    assert shipped == json.loads((CHART_DIR / "dashboards" / "clora.json").read_text())


def test_default_loraruntime(ci_objects: list[dict[str, Any]]) -> None:
    runtime = one(ci_objects, RUNTIME_KIND)
    assert runtime["apiVersion"] == API_VERSION
    assert runtime["metadata"]["namespace"] == "clora-system"
    assert runtime["spec"]["baseModel"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert runtime["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Runtime pods get the cuda flavour through the operator's default runtime image; its own stays cpu.
    container = operator_container(ci_objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CLORA_RUNTIME_IMAGE"] == "clora:0.1.0-cuda" and "image" not in runtime["spec"]
    assert container["image"] == "clora:0.1.0-cpu"


# ---- RBAC -------------------------------------------------------------------------------------------


def _normalize_permissions(declared: Iterable[Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples from tuples (group, resource, verbs) or dicts/objects with
    apiGroup(s)/resource(s)/verbs, whichever shape the operator declares."""
    out: set[tuple[str, str, str]] = set()
    for item in declared:
        if isinstance(item, dict):
            groups = item.get("apiGroups", [item.get("apiGroup", item.get("api_group", ""))])
            resources = item.get("resources", [item.get("resource")])
            verbs = item["verbs"]
        elif isinstance(item, tuple | list):
            group, resource, verbs = item
            groups = [group] if isinstance(group, str) else list(group)
            resources = [resource] if isinstance(resource, str) else list(resource)
        else:
            groups = [getattr(item, "api_group", getattr(item, "apiGroup", ""))]
            resources = [item.resource]
            verbs = item.verbs
        verbs = [verbs] if isinstance(verbs, str) else list(verbs)
        out |= {(g, r, v) for g in groups for r in resources for v in verbs}
    return out


def _operator_permissions() -> set[tuple[str, str, str]]:
    try:
        k8s = importlib.import_module("clora_operator.k8s")
    except ModuleNotFoundError as exc:
        if not (exc.name and exc.name.startswith("clora_operator")):
            raise
        missing("clora_operator.k8s (REQUIRED_PERMISSIONS) does not exist yet")
    return _normalize_permissions(k8s.REQUIRED_PERMISSIONS)


def _granted_to(
    objects: list[dict[str, Any]], service_account: str, namespace: str
) -> set[tuple[str, str, str]]:
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
    }
    granted: set[tuple[str, str, str]] = set()
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount"
            and s["name"] == service_account
            and s.get("namespace", namespace) == namespace
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        role_ns = None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles[(ref["kind"], role_ns, ref["name"])]
        for rule in role["rules"]:
            assert (
                "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            ), rule
            assert not rule.get("resourceNames"), "resourceNames would make the comparison below too coarse"
            granted |= _normalize_permissions([rule])
    return granted


def test_operator_rbac_is_exactly_what_it_uses(rendering: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendering
    service_account = one(objects, "ServiceAccount")["metadata"]["name"]
    assert operator_deployment_sa(objects) == service_account
    granted = _granted_to(objects, service_account, "clora-system")
    needed = _operator_permissions()
    # Both directions: a missing verb breaks the operator on a real cluster, an extra one is more power
    # than it needs. The source of truth is clora_operator.k8s.REQUIRED_PERMISSIONS.
    assert not needed - granted, (
        f"{name}: the chart misses what the operator calls: {sorted(needed - granted)}"
    )
    assert not granted - needed, (
        f"{name}: the chart grants what the operator never calls: {sorted(granted - needed)}"
    )


def operator_deployment_sa(objects: list[dict[str, Any]]) -> str:
    return one(objects, "Deployment", "operator")["spec"]["template"]["spec"]["serviceAccountName"]


def test_user_roles_aggregate_into_view_and_edit(default_objects: list[dict[str, Any]]) -> None:
    viewer = one(default_objects, "ClusterRole", "viewer")
    editor = one(default_objects, "ClusterRole", "editor")
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    view = _normalize_permissions(viewer["rules"])
    edit = _normalize_permissions(editor["rules"])
    kinds = {"loraexperiments", "loraruntimes"}
    assert {v for _, _, v in view} == {"get", "list", "watch"}
    assert {r for _, r, _ in view} >= kinds and {r for _, r, _ in edit} == kinds  # users never write status
    assert {v for _, _, v in edit} >= {"create", "update", "patch", "delete"}
    assert {g for g, _, _ in view | edit} == {"clora.dev"}


# ---- CRDs: the chart's copy and what kubectl shows -------------------------------------------------------


def test_chart_crds_equal_repo_crds() -> None:
    repo_crds()  # fails under CI, skips elsewhere, while crds/ is empty
    ours = {p.name: p.read_bytes() for p in CRDS_DIR.glob("*.yaml")}
    chart = {
        p.name: p.read_bytes() for p in (CHART_DIR / "crds").glob("*.yaml") if p.name != KOPF_PEERING_CRDS
    }
    assert set(chart) == set(ours), "run clora crds"
    stale = [name for name in ours if chart[name] != ours[name]]
    assert not stale, f"charts/clora/crds/ differs from crds/ in {stale}: run clora crds"


def test_kopf_peering_crds_serve_what_kopf_looks_for() -> None:
    docs = load_docs((CHART_DIR / "crds" / KOPF_PEERING_CRDS).read_text())
    served = {(d["spec"]["group"], d["spec"]["names"]["plural"], d["spec"]["scope"]) for d in docs}
    assert served == {
        ("kopf.dev", "clusterkopfpeerings", "Cluster"),
        ("kopf.dev", "kopfpeerings", "Namespaced"),
    }
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def _crd_for(kind: str) -> dict[str, Any]:
    for crd in repo_crds():
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    pytest.fail(f"no CRD for {kind} in {CRDS_DIR}")


def test_crds_give_kubectl_names_columns_and_categories() -> None:
    """`kubectl get lx` shows Phase/Step/Reward/Node/Age, `kubectl get clora` lists both kinds, and
    `kubectl describe` shows conditions (a status subresource with conditions in its schema)."""
    experiment, runtime = _crd_for(EXPERIMENT_KIND), _crd_for(RUNTIME_KIND)
    assert experiment["spec"]["names"]["shortNames"] == ["lx"]
    assert runtime["spec"]["names"]["shortNames"] == ["lrt"]
    for crd in (experiment, runtime):
        kubernetes_validate.validate(crd, K8S_VERSIONS[0], strict=True)
        assert CATEGORY in crd["spec"]["names"]["categories"]
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        assert "status" in version["subresources"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert "conditions" in status["properties"]
    (version,) = [v for v in experiment["spec"]["versions"] if v["storage"]]
    # What plain `kubectl get lx` shows: the priority-0 columns (priority 1 shows with -o wide).
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Step", "Reward", "Node", "Age"]


def _undescribed(schema: dict[str, Any], where: str) -> list[str]:
    out = [] if schema.get("description") else [where]
    for key, sub in schema.get("properties", {}).items():
        out += _undescribed(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict) and schema["items"].get("properties"):
        out += [p for p in _undescribed(schema["items"], f"{where}[]") if p != f"{where}[]"]
    if isinstance(schema.get("additionalProperties"), dict) and schema["additionalProperties"].get(
        "properties"
    ):
        out += [
            p for p in _undescribed(schema["additionalProperties"], f"{where}{{}}") if p != f"{where}{{}}"
        ]
    return out


@pytest.mark.parametrize("kind", [EXPERIMENT_KIND, RUNTIME_KIND])
def test_every_field_has_a_description_for_kubectl_explain(kind: str) -> None:
    (version,) = [v for v in _crd_for(kind)["spec"]["versions"] if v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]
    missing_text = [p for part in ("spec", "status") for p in _undescribed(schema["properties"][part], part)]
    assert not missing_text, (
        f"{kind} fields without a description (kubectl explain shows nothing): {missing_text}"
    )
    training = schema["properties"]["spec"]["properties"].get("training")
    if kind == EXPERIMENT_KIND:
        assert training and len(training["properties"]) >= 8


def test_kubectl_explain_and_categories(tmp_path: Path) -> None:
    """The real kubectl, reading our CRDs' schemas as an API server publishes them: `kubectl explain`
    describes every training field, and the category `clora` holds both kinds."""
    experiment = _crd_for(EXPERIMENT_KIND)
    (version,) = [v for v in experiment["spec"]["versions"] if v["storage"]]
    training = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    with kube_emulator(repo_crds(), tmp_path) as kubeconfig:
        out = kubectl(kubeconfig, "explain", "loraexperiment.spec.training").stdout
        assert "KIND:       LoRAExperiment" in out and training["description"].split(".")[0] in out
        for field, schema in training["properties"].items():
            assert re.search(rf"^  {field}\t<", out, re.MULTILINE), f"kubectl explain lacks {field}:\n{out}"
            # kubectl wraps descriptions at 80 columns: compare with whitespace collapsed.
            assert " ".join(schema["description"].split())[:60] in " ".join(out.split()), field
        out = kubectl(kubeconfig, "explain", "lrt.spec.capacity.maxAdapters").stdout
        assert "FIELD: maxAdapters <integer>" in out
        out = kubectl(kubeconfig, "api-resources", "--categories", CATEGORY, "-o", "name").stdout
        assert sorted(out.split()) == ["loraexperiments.clora.dev", "loraruntimes.clora.dev"]


# ---- kubectl client-side dry runs ------------------------------------------------------------------------


def _example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_kubectl_dry_run_of_chart_and_examples(tmp_path: Path) -> None:
    """`kubectl apply --dry-run=client` needs a server for discovery: a kmock emulator that serves the
    built-in kinds, our CRDs, kopf's peering CRDs and the Prometheus operator's two kinds."""
    prometheus_crds = [
        {
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": kind.lower() + "s"},
                "versions": [{"name": "v1"}],
            }
        }
        for kind in ("ServiceMonitor", "PodMonitor")
    ]
    crds = repo_crds() + load_docs((CHART_DIR / "crds" / KOPF_PEERING_CRDS).read_text()) + prometheus_crds
    examples = _example_files()
    if not examples:
        missing(f"no examples under {EXAMPLES_DIR}")
    manifests: list[tuple[str, Path]] = []
    for name, (values, apis) in RENDERINGS.items():
        path = tmp_path / f"chart-{name}.yaml"
        path.write_text(helm_template(values, apis))
        manifests.append((f"chart ({name})", path))
    manifests += [(str(p.relative_to(REPO_ROOT)), p) for p in examples]
    for i, text in enumerate(_doc_yaml_blocks()):
        path = tmp_path / f"install-doc-{i}.yaml"
        path.write_text(text)
        manifests.append((f"docs/install.md block {i}", path))

    with kube_emulator(crds, tmp_path) as kubeconfig:
        for label, path in manifests:
            docs = load_docs(path.read_text())
            if not docs:
                continue
            proc = kubectl(
                kubeconfig, "apply", "--dry-run=client", "--validate=false", "-f", path, check=False
            )
            assert proc.returncode == 0, f"{label}: {proc.stderr}"
            applied = [line for line in proc.stdout.splitlines() if line.endswith("(dry run)")]
            assert len(applied) == len(docs), f"{label}: {proc.stdout}"


# ---- docs/install.md ----------------------------------------------------------------------------------


def _doc_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", INSTALL_DOC.read_text(), re.DOTALL)


def test_install_doc_kind_walkthrough_is_consistent(tmp_path: Path) -> None:
    """The kind walkthrough's `helm install --set ...` creates the LoRARuntime its experiment names, and
    the experiment passes `clora validate`'s checks against it (schema, CEL, rank and token budget)."""
    text = INSTALL_DOC.read_text()
    (install,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) if "kind load" in b]
    command = install[install.index("helm install") :].replace("\\\n", " ").splitlines()[0]
    sets = re.findall(r"--set (\S+)", command)
    namespace = re.search(r"(?:-n|--namespace) (\S+)", command).group(1)
    runtime = one(load_docs(helm_template(sets=sets, namespace=namespace)), RUNTIME_KIND)
    experiments = [
        d for block in _doc_yaml_blocks() for d in load_docs(block) if d["kind"] == EXPERIMENT_KIND
    ]
    assert experiments, "docs/install.md shows no LoRAExperiment for kind"
    for experiment in experiments:
        assert not check_object(experiment), check_object(experiment)
        assert experiment["spec"]["runtime"] == runtime["metadata"]["name"]
        assert experiment["metadata"]["namespace"] == runtime["metadata"]["namespace"]
        assert not check_reference(experiment, runtime), check_reference(experiment, runtime)
    # The image it builds and loads into kind is the one the chart's defaults run.
    assert "-t clora:0.1.0-cpu" in install and "kind load docker-image clora:0.1.0-cpu" in install
    assert operator_container(load_docs(helm_template()))["image"] == "clora:0.1.0-cpu"


NAMESPACED_RESOURCES = {"pods", "secrets", "configmaps", "events", "loraexperiments", "loraruntimes"}


def test_operator_limited_to_namespaces_gets_roles_there_only(ci_objects: list[dict[str, Any]]) -> None:
    """MEDIUM 9: with operator.namespaces, pods, Secrets, ConfigMaps, Events and clora's resources are
    granted by a Role in each watched namespace; the ClusterRole keeps the cluster-scoped rights."""
    cluster_role = one(ci_objects, "ClusterRole", "-operator")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert not cluster_resources & NAMESPACED_RESOURCES, cluster_resources
    assert cluster_resources <= {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
    roles = find(ci_objects, "Role", "-operator")
    bindings = find(ci_objects, "RoleBinding", "-operator")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert {r for rule in role["rules"] for r in rule["resources"]} >= NAMESPACED_RESOURCES
    # Every namespace (the default): one ClusterRole holds everything, no Role.
    default = load_docs(helm_template())
    assert not find(default, "Role") and not find(default, "RoleBinding")
    everything = {r for rule in one(default, "ClusterRole", "-operator")["rules"] for r in rule["resources"]}
    assert everything >= NAMESPACED_RESOURCES
    # A pattern's namespaces cannot be listed: cluster-wide again.
    values = {"operator": {"namespaces": ["ml-*"], "replicas": 1, "peering": {"enabled": False}}}
    pattern = load_docs(helm_template([_values_file(values)]))
    assert (
        not find(pattern, "Role")
        and {r for rule in one(pattern, "ClusterRole", "-operator")["rules"] for r in rule["resources"]}
        >= NAMESPACED_RESOURCES
    )


def test_privileged_runtime_fields_need_the_chart_to_allow_them(
    default_objects: list[dict[str, Any]], ci_objects: list[dict[str, Any]]
) -> None:
    """MEDIUM 9: hostPath and custom images are off unless runtime.allowHostPath/allowedImages say so."""
    from clora_operator import config as operator_config

    default_args = operator_container(default_objects)["args"]
    assert not [a for a in default_args if a.startswith(("--allow-host-path", "--allowed-image"))]
    args = operator_container(ci_objects)["args"]
    assert "--allow-host-path" in args
    assert "--allowed-image=registry.example.com/team/clora:0.1.0-cuda" in args
    parser = argparse.ArgumentParser()
    operator_config.add_arguments(parser)
    cfg = operator_config.from_args(parser.parse_args([a for a in args if a != "operator"]))
    assert cfg.allow_host_path is True and cfg.allowed_images == [
        "registry.example.com/team/clora:0.1.0-cuda"
    ]
    plain = operator_config.from_args(parser.parse_args([]))
    assert plain.allow_host_path is False and plain.allowed_images == []
