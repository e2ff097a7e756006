"""The only module that talks to the Kubernetes API (kopf's own watching and patching aside).

It declares REQUIRED_PERMISSIONS, every (apiGroup, resource, verbs) the operator's code and kopf
use; the chart's RBAC is tested against it. Requests go through `kubernetes_asyncio` (the asyncio
port of the official client: kopf's event loop is never blocked by a request, and no thread pool
sits between them; scripts/compare-kube-clients.py measures it against the official client). Lists
are filtered by label here as well, since the test emulator ignores label selectors.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from clora.constants import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    EXPERIMENT_KIND,
    EXPERIMENT_PLURAL,
    GROUP,
    LABEL_RUNTIME,
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    RUNTIME_KIND,
    RUNTIME_PLURAL,
    TOKEN_SECRET_KEY,
    VERSION,
)

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Permission:
    """One RBAC rule the operator needs."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]


REQUIRED_PERMISSIONS: tuple[Permission, ...] = (
    # kopf watches and patches (finalizer, progress annotations) both resources; the operator
    # reads a runtime when it validates an experiment, and an experiment after a write conflict.
    Permission(GROUP, RUNTIME_PLURAL, ("get", "list", "watch", "patch")),
    Permission(GROUP, f"{RUNTIME_PLURAL}/status", ("get", "patch")),
    Permission(GROUP, EXPERIMENT_PLURAL, ("get", "list", "watch", "patch")),
    Permission(GROUP, f"{EXPERIMENT_PLURAL}/status", ("get", "patch")),
    # Runtime pods: created, listed and deleted here; watched by kopf with an event handler only
    # (no finalizer is ever put on them).
    Permission("", "pods", ("get", "list", "watch", "create", "delete")),
    # The runtime token: created once, then read.
    Permission("", "secrets", ("get", "create")),
    # One runtime pod per matching node.
    Permission("", "nodes", ("get", "list")),
    # An experiment's dataset may be a ConfigMap key.
    Permission("", "configmaps", ("get",)),
    # Events on experiments and runtimes (kopf posts them).
    Permission("", "events", ("create",)),
    # kopf: peering between replicas (cluster-wide and per-namespace), and watching for
    # namespaces (with --namespace patterns) and CRDs appearing.
    Permission("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch")),
    Permission("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch")),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
    Permission("", "namespaces", ("list", "watch")),
    # aibrix ModelAdapters of experiments that publish there (spec.publish.aibrix).
    Permission("model.aibrix.ai", "modeladapters", ("get", "create", "patch")),
)


class KubeError(Exception):
    """The API server refused a request (a status other than 404, which the calls answer as None)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class Conflict(KubeError):
    """409: the object changed since it was read (a stale resourceVersion); read again and retry."""


def _error(e: ApiException) -> KubeError:
    text = e.body.decode() if isinstance(e.body, bytes) else str(e.body or e.reason)
    return (Conflict if e.status == 409 else KubeError)(int(e.status or 0), text)


_NAME = re.compile(DNS_SUBDOMAIN_PATTERN)
_NAMESPACE = re.compile(DNS_LABEL_PATTERN)


class InvalidName(ValueError):
    """A name or namespace that is not a Kubernetes name: refused before any request is made."""


def _checked(namespace: str, name: str) -> tuple[str, str]:
    """Every read and write names one object in one namespace: never a path that could reach into
    another namespace or kind with the operator's rights (the models check names first; this is the
    last line)."""
    if not (0 < len(namespace) <= MAX_LABEL_LENGTH and _NAMESPACE.fullmatch(namespace)):
        raise InvalidName(f"not a namespace: {namespace[:80]!r}")
    if not (0 < len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name)):
        raise InvalidName(f"not an object name: {name[:80]!r}")
    return namespace, name


class KubeClient:
    """clora's reads and writes, as plain dicts, over one kubernetes_asyncio ApiClient. Every call
    that names an object checks the namespace and name first (`_checked`)."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(cls) -> KubeClient:
        """The in-cluster service account if there is one, else the kubeconfig (as kopf does)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            try:
                # KUBECONFIG as it is now (the library reads it once, at import).
                path = os.environ.get("KUBECONFIG") or None
                await config.load_kube_config(config_file=path, client_configuration=configuration)
            except (ConfigException, FileNotFoundError) as e:
                raise kopf.PermanentError(f"no Kubernetes credentials: {e}") from e
        # Answers are read as plain dicts: a model's client-side checks (an unset required field in a
        # container status, say) must not make a good answer an error.
        configuration.client_side_validation = False
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self._api.close()

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self._api.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    async def _call(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """The call's answer, None for 404, KubeError (Conflict for 409) for any other refusal."""
        try:
            return await call(*args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise _error(e) from e

    # clora's objects.

    async def get_runtime(self, namespace: str, name: str) -> dict[str, Any] | None:
        namespace, name = _checked(namespace, name)
        return await self._call(
            self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, RUNTIME_PLURAL, name
        )

    async def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        namespace, name = _checked(namespace, name)
        return await self._call(
            self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, EXPERIMENT_PLURAL, name
        )

    async def _patch_status(
        self, plural: str, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        namespace, name = _checked(namespace, name)
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version:
            # Optimistic concurrency: the API server answers 409 if the object changed meanwhile.
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            body,
            _content_type=MERGE_PATCH,
        )

    async def patch_experiment_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        """The object after the patch; None when it is gone; Conflict when `resource_version` is stale."""
        return await self._patch_status(EXPERIMENT_PLURAL, namespace, name, patch, resource_version)

    async def patch_runtime_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        return await self._patch_status(RUNTIME_PLURAL, namespace, name, patch, None) is not None

    # Core objects.

    async def list_nodes(self) -> list[dict[str, Any]]:
        answer = await self._call(self._core.list_node)
        return [self._plain(n) for n in (answer.items if answer else [])]

    async def list_runtime_pods(self, namespace: str, runtime: str) -> list[dict[str, Any]]:
        answer = await self._call(
            self._core.list_namespaced_pod, namespace, label_selector=f"{LABEL_RUNTIME}={runtime}"
        )
        pods = [self._plain(p) for p in (answer.items if answer else [])]
        # Filter here too: a selector the server ignored must not widen the answer.
        return [
            p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_RUNTIME) == runtime
        ]

    async def create_pod(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self._create(self._core.create_namespaced_pod, namespace, body)

    async def delete_pod(self, namespace: str, name: str) -> bool:
        """False if it was gone already."""
        namespace, name = _checked(namespace, name)
        return await self._call(self._core.delete_namespaced_pod, name, namespace) is not None

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        namespace, name = _checked(namespace, name)
        answer = await self._call(self._core.read_namespaced_config_map, name, namespace)
        return self._plain(answer) if answer is not None else None

    async def read_token(self, namespace: str, name: str, key: str = TOKEN_SECRET_KEY) -> str | None:
        """A key of a Secret (by default a runtime's token), or None if the Secret or key is missing."""
        secret = await self.get_secret(namespace, name)
        if secret is None:
            return None
        return secret_value(secret, key)

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        namespace, name = _checked(namespace, name)
        answer = await self._call(self._core.read_namespaced_secret, name, namespace)
        return self._plain(answer) if answer is not None else None

    async def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self._create(self._core.create_namespaced_secret, namespace, body)

    async def apply_model_adapter(self, namespace: str, body: Mapping[str, Any]) -> None:
        """Creates the aibrix ModelAdapter, or patches the spec of the one of that name."""
        args = ("model.aibrix.ai", "v1alpha1", namespace, "modeladapters")
        try:
            await self._call(self._custom.create_namespaced_custom_object, *args, dict(body))
        except Conflict:
            name = body["metadata"]["name"]
            patch = {"spec": body["spec"]}
            await self._call(
                self._custom.patch_namespaced_custom_object, *args, name, patch, _content_type=MERGE_PATCH
            )

    async def _create(self, call: Any, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Creates the object; None if one of that name exists already (creation is idempotent)."""
        try:
            return self._plain(await self._call(call, namespace, dict(body)))
        except Conflict:
            return None


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A key's value of a Secret (a plain dict), or None without it."""
    data = (secret.get("data") or {}).get(key)
    if data:
        return base64.b64decode(data).decode()
    # An API server turns stringData into data; an emulator may keep it as written.
    value = (secret.get("stringData") or {}).get(key)
    return value if isinstance(value, str) else None


def object_ref(kind: str, namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    """The part of an object kopf needs to post an Event about it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"namespace": namespace, "name": name, "uid": uid or ""},
    }


def experiment_ref(namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    return object_ref(EXPERIMENT_KIND, namespace, name, uid)


def runtime_ref(namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    return object_ref(RUNTIME_KIND, namespace, name, uid)


def post_event(obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """Queues a Kubernetes Event about `obj`; kopf posts it in the background."""
    kopf.event(dict(obj), type="Warning" if warning else "Normal", reason=reason, message=message)
