"""Pure builders of what a LoRARuntime owns: one runtime pod per matching node, and its token Secret.

Why operator-managed pods and not a DaemonSet: placement needs each pod's identity, address and
load, and a pod may only be replaced after its experiments were checkpointed and moved. A
DaemonSet's rolling update would restart pods under running experiments on its own schedule, and
its controller cannot be told "this pod is broken, replace it" without the operator deleting the
pod anyway. Owning the pods directly costs a node list per pass, which the operator needs to
report the pool anyway. Each pod is pinned to its node with node affinity on metadata.name, as
the DaemonSet controller does, so the scheduler still checks resources and taints.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clora.api import LoRARuntime
from clora.api.runtime_types import GPU_RESOURCE, default_shm_size
from clora.constants import (
    ANNOTATION_POD_TEMPLATE_HASH,
    API_VERSION,
    COMPONENT_RUNTIME,
    DEFAULT_RUNTIME_MEMORY_LIMIT,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_NODE,
    LABEL_RUNTIME,
    MANAGED_BY,
    RUNTIME_CHECKPOINT_EMPTYDIR_SIZE_LIMIT,
    RUNTIME_HOME_SIZE_LIMIT,
    RUNTIME_KIND,
    RUNTIME_MODEL_CACHE_SIZE_LIMIT,
    RUNTIME_PORT,
    RUNTIME_TMP_SIZE_LIMIT,
    TOKEN_FILE_ENV,
    TOKEN_SECRET_KEY,
)

TOKEN_MOUNT = "/var/run/secrets/clora"
CHECKPOINT_VOLUME = "checkpoints"
TOKEN_VOLUME = "token"
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_MOUNT = "/var/cache/clora"
# The container runtime's /dev/shm is 64 MiB: too small for vLLM's adapter exports, Ray and NCCL.
SHM_VOLUME = "dshm"
SHM_MOUNT = "/dev/shm"
TMP_VOLUME = "tmp"
HOME_VOLUME = "home"
HOME_MOUNT = "/home/clora"  # the image's HOME (Dockerfile)
RUNTIME_UID = 10001  # the image's non-root user (Dockerfile: USER 10001:10001)
# The model loads before /readyz answers; a startup probe gives it up to 30 minutes.
STARTUP_PROBE_PERIOD_S = 10
STARTUP_PROBE_FAILURES = 180
GRACE_PERIOD_S = 120


def _dns_label(text: str, limit: int = 63) -> str:
    """A DNS-1123 label from `text`; long or altered names get a short hash so they stay unique."""
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if clean == text and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{clean[: limit - 9].rstrip('-')}-{digest}"


def pod_name(runtime: str, node: str) -> str:
    """The runtime pod of `runtime` on `node`: deterministic, so a restarted operator finds it again."""
    return _dns_label(f"{runtime}-{node}")


def secret_name(runtime: str) -> str:
    """The Secret holding the bearer token of `runtime`'s pods."""
    return _dns_label(f"{runtime}-token", limit=253)


def labels_for(runtime: str) -> dict[str, str]:
    return {
        LABEL_RUNTIME: runtime,
        LABEL_COMPONENT: COMPONENT_RUNTIME,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def node_matches(node_labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether a node with these labels matches a nodeSelector (every pair present)."""
    return all(node_labels.get(k) == v for k, v in selector.items())


def owner_reference(runtime: LoRARuntime) -> dict[str, Any]:
    """Makes the garbage collector delete the object with its LoRARuntime."""
    return {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_KIND,
        "name": runtime.metadata.name,
        "uid": runtime.metadata.uid or "",
        "controller": True,
        # blockOwnerDeletion would need update on loraruntimes/finalizers (OwnerReferencesPermission-
        # Enforcement); the operator releases experiments itself, so foreground deletion gains nothing.
        "blockOwnerDeletion": False,
    }


def build_token_secret(runtime: LoRARuntime, token: str) -> dict[str, Any]:
    """The Secret with the runtime pods' bearer token (generated once by the caller)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(runtime.metadata.name),
            "namespace": runtime.metadata.namespace,
            "labels": labels_for(runtime.metadata.name),
            "ownerReferences": [owner_reference(runtime)],
        },
        "stringData": {TOKEN_SECRET_KEY: token},
    }


def owns_token_secret(runtime: LoRARuntime, secret: Mapping[str, Any]) -> bool:
    """Whether `secret` is the token Secret clora created for this LoRARuntime: clora's labels and
    this runtime as its controlling owner (by uid, when the runtime has one)."""
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in labels_for(runtime.metadata.name).items()):
        return False
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("controller")]
    return len(owners) == 1 and (
        owners[0].get("kind") == RUNTIME_KIND
        and owners[0].get("name") == runtime.metadata.name
        and (not runtime.metadata.uid or owners[0].get("uid") == runtime.metadata.uid)
    )


def runtime_args(runtime: LoRARuntime) -> list[str]:
    """The `clora runtime` arguments for one pod of this pool."""
    spec = runtime.spec
    args = [
        "runtime",
        "--model",
        spec.base_model,
        "--host",
        "0.0.0.0",
        "--port",
        str(RUNTIME_PORT),
        "--sampler",
        spec.sampler,
        "--dtype",
        spec.dtype,
        "--max-adapters",
        str(spec.capacity.max_adapters),
        "--max-rank",
        str(spec.capacity.max_rank),
        "--tokens-per-tick",
        str(spec.capacity.tokens_per_tick),
        "--replicas",
        str(spec.replicas),
        "--devices-per-replica",
        str(spec.devices_per_replica),
        "--attn-implementation",
        spec.attention_implementation,
        "--checkpoint-dir",
        spec.checkpoint_volume.mount_path,
        # Dataset paths are read from the checkpoint volume only (datasets live there: the examples'
        # PVC); the runtime refuses a path anywhere else.
        "--dataset-roots",
        spec.checkpoint_volume.mount_path,
        # Checkpoint everything on SIGTERM within the pod's grace period (below).
        "--grace-period",
        str(GRACE_PERIOD_S - 20),
    ]
    gpus = spec.resources.limits.get(GPU_RESOURCE)
    if spec.replicas > 1 and gpus is not None:
        # The pod's GPUs, as its Ray instance is to hand them out (one per replica), not left to
        # detection inside the container.
        args += ["--ray-gpus", str(gpus)]
    # vLLM's settings only when set: unset, the runtime picks them for its device.
    for flag, value in (
        ("--vllm-gpu-memory-utilization", spec.gpu_memory_utilization),
        ("--vllm-max-num-seqs", spec.max_num_seqs),
        ("--vllm-enforce-eager", spec.enforce_eager),
    ):
        if value is not None:
            args += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _checkpoint_volume(runtime: LoRARuntime) -> dict[str, Any]:
    vol = runtime.spec.checkpoint_volume
    if vol.persistent_volume_claim is not None:
        return {"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": vol.persistent_volume_claim.wire()}
    if vol.host_path is not None:
        return {"name": CHECKPOINT_VOLUME, "hostPath": vol.host_path.wire()}
    empty_dir = vol.empty_dir.wire() if vol.empty_dir else {}
    return {
        "name": CHECKPOINT_VOLUME,
        "emptyDir": {"sizeLimit": RUNTIME_CHECKPOINT_EMPTYDIR_SIZE_LIMIT, **empty_dir},
    }


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[mkEPTGM]?)$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})


def quantity_bytes(value: str | int) -> float | None:
    """A memory quantity in bytes ("16Gi", "500M", 1024), None when it does not parse."""
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        return None
    try:
        return float(match.group(1)) * _UNITS[match.group(2)]
    except (ValueError, KeyError):
        return None


def container_resources(runtime: LoRARuntime) -> dict[str, Any]:
    """spec.resources, with a memory limit when none is set: DEFAULT_RUNTIME_MEMORY_LIMIT, or the
    memory request when that is larger (a limit below the request is refused by the API server)."""
    resources = {k: dict(v) for k, v in runtime.spec.resources.wire().items() if v}
    limits = resources.setdefault("limits", {})
    if "memory" not in limits:
        request = resources.get("requests", {}).get("memory")
        default = quantity_bytes(DEFAULT_RUNTIME_MEMORY_LIMIT) or 0
        bigger = request is not None and (quantity_bytes(request) or 0) > default
        limits["memory"] = request if bigger else DEFAULT_RUNTIME_MEMORY_LIMIT
    return resources


def shm_size(runtime: LoRARuntime) -> str | int:
    """The pod's /dev/shm size: spec.shmSize, else sized from the capacity (default_shm_size)."""
    spec = runtime.spec
    return spec.shm_size if spec.shm_size is not None else default_shm_size(spec.capacity, spec.replicas)


def template_hash(runtime: LoRARuntime, image: str) -> str:
    """Hash of everything that shapes a runtime pod: a different hash means the pod is stale."""
    shape = {"spec": runtime.spec.wire(), "image": image}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def build_runtime_pod(runtime: LoRARuntime, node: str, *, image: str) -> dict[str, Any]:
    """The runtime pod of `runtime` on `node`."""
    spec = runtime.spec
    name = runtime.metadata.name
    probe = {"httpGet": {"path": "/readyz", "port": RUNTIME_PORT}, "periodSeconds": 5}
    container: dict[str, Any] = {
        "name": "runtime",
        "image": image,
        "command": ["clora"],
        "args": runtime_args(runtime),
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "env": [{"name": TOKEN_FILE_ENV, "value": f"{TOKEN_MOUNT}/{TOKEN_SECRET_KEY}"}],
        "readinessProbe": probe,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": RUNTIME_PORT},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": RUNTIME_PORT},
            "periodSeconds": STARTUP_PROBE_PERIOD_S,
            "failureThreshold": STARTUP_PROBE_FAILURES,
        },
        "resources": container_resources(runtime),
        "volumeMounts": [
            {"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint_volume.mount_path},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": True},
            # The image's model cache (CLORA_CACHE_DIR): a converted model survives container restarts.
            {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_MOUNT},
            {"name": SHM_VOLUME, "mountPath": SHM_MOUNT},
            # The root filesystem is read-only: what the runtime writes outside the volumes above.
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": HOME_VOLUME, "mountPath": HOME_MOUNT},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, node),
            "namespace": runtime.metadata.namespace,
            "labels": {**labels_for(name), LABEL_NODE: _dns_label(node)},
            "annotations": {ANNOTATION_POD_TEMPLATE_HASH: template_hash(runtime, image)},
            "ownerReferences": [owner_reference(runtime)],
        },
        "spec": {
            "restartPolicy": "Always",
            # Volumes (checkpoints on a PVC or hostPath) become writable by the non-root runtime user.
            "securityContext": {"fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}},
            # The runtime never calls the Kubernetes API: no service-account token in the pod.
            "automountServiceAccountToken": False,
            # SIGTERM makes the runtime checkpoint every adapter before it exits.
            "terminationGracePeriodSeconds": GRACE_PERIOD_S,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                        ]
                    }
                }
            },
            "nodeSelector": dict(spec.node_selector),
            "tolerations": [t.wire() for t in spec.tolerations],
            "containers": [container],
            "volumes": [
                _checkpoint_volume(runtime),
                {"name": TOKEN_VOLUME, "secret": {"secretName": secret_name(name)}},
                {"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": RUNTIME_MODEL_CACHE_SIZE_LIMIT}},
                {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(runtime)}},
                {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": RUNTIME_TMP_SIZE_LIMIT}},
                {"name": HOME_VOLUME, "emptyDir": {"sizeLimit": RUNTIME_HOME_SIZE_LIMIT}},
            ],
        },
    }


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the operator reads from a runtime pod object."""

    name: str
    namespace: str
    runtime: str
    node: str
    ip: str | None
    phase: str
    ready: bool
    deleting: bool
    template_hash: str | None

    @property
    def url(self) -> str | None:
        return f"http://{self.ip}:{RUNTIME_PORT}" if self.ip else None

    @property
    def finished(self) -> bool:
        """The pod will not run again (evicted, or its containers exited for good)."""
        return self.phase in ("Failed", "Succeeded")


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    """Reads a pod object (a dict as the API returns it)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    labels = meta.get("labels") or {}
    return PodInfo(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        runtime=labels.get(LABEL_RUNTIME, ""),
        node=spec.get("nodeName") or _pinned_node(spec),
        ip=status.get("podIP") or None,
        phase=status.get("phase") or "Pending",
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        template_hash=(meta.get("annotations") or {}).get(ANNOTATION_POD_TEMPLATE_HASH),
    )


def _pinned_node(spec: Mapping[str, Any]) -> str:
    """The node a not-yet-bound pod is pinned to by its node affinity."""
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in affinity.get("nodeSelectorTerms") or []:
        for match in term.get("matchFields") or []:
            if match.get("key") == "metadata.name" and match.get("values"):
                return str(match["values"][0])
    return ""


def is_runtime_pod(labels: Mapping[str, str]) -> bool:
    return labels.get(LABEL_COMPONENT) == COMPONENT_RUNTIME and labels.get(LABEL_MANAGED_BY) == MANAGED_BY


@dataclass(frozen=True, slots=True)
class PodPlan:
    """What to change so the pool has one current pod per matching node."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


def plan_pods(
    runtime: LoRARuntime,
    nodes: Iterable[tuple[str, Mapping[str, str]]],
    pods: Iterable[PodInfo],
    *,
    image: str,
    busy: frozenset[str] = frozenset(),
) -> PodPlan:
    """One pod per node matching the nodeSelector: create the missing, delete the unwanted.

    Finished pods are deleted (and so replaced on the next pass). A stale pod (built from an
    older spec) is replaced only once no experiment is on it (`busy`), so a spec change never
    interrupts training."""
    wanted = sorted(name for name, labels in nodes if node_matches(labels, runtime.spec.node_selector))
    current_hash = template_hash(runtime, image)
    plan = PodPlan()
    have: set[str] = set()
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.deleting:
            have.add(pod.name)  # wait until it is gone before creating its successor
            continue
        expected_node = next((n for n in wanted if pod_name(runtime.metadata.name, n) == pod.name), None)
        stale = pod.template_hash != current_hash and pod.name not in busy
        if expected_node is None or pod.finished or stale:
            plan.delete.append(pod.name)
        have.add(pod.name)
    for node in wanted:
        if pod_name(runtime.metadata.name, node) not in have:
            plan.create.append(build_runtime_pod(runtime, node, image=image))
    return plan
