"""The only module that talks to the Kubernetes API (kopf's own watching and patching aside).

It declares REQUIRED_PERMISSIONS, every (apiGroup, resource, verbs) the operator's code and kopf
use; the chart's RBAC is tested against it. Requests are plain JSON over httpx with the
credentials kopf logged in with, so the operator runs against any API server, the test emulator
included (which ignores label selectors: lists are filtered here as well).
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

from clora.constants import (
    EXPERIMENT_KIND,
    EXPERIMENT_PLURAL,
    GROUP,
    LABEL_RUNTIME,
    RUNTIME_KIND,
    RUNTIME_PLURAL,
    TOKEN_SECRET_KEY,
    VERSION,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Permission:
    """One RBAC rule the operator needs."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]


REQUIRED_PERMISSIONS: tuple[Permission, ...] = (
    # kopf watches and patches (finalizer, progress annotations) both resources; the operator
    # reads a runtime when it validates an experiment.
    Permission(GROUP, RUNTIME_PLURAL, ("get", "list", "watch", "patch")),
    Permission(GROUP, f"{RUNTIME_PLURAL}/status", ("get", "patch")),
    Permission(GROUP, EXPERIMENT_PLURAL, ("get", "list", "watch", "patch")),
    Permission(GROUP, f"{EXPERIMENT_PLURAL}/status", ("get", "patch")),
    # Runtime pods: created and deleted here; watched and patched by kopf (one timer per pod
    # needs kopf's finalizer on it).
    Permission("", "pods", ("get", "list", "watch", "create", "patch", "delete")),
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
)


class KubeError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=str(info.ca_path))
    elif info.ca_data:
        data = info.ca_data if isinstance(info.ca_data, str) else info.ca_data.decode()
        if "BEGIN CERTIFICATE" not in data:
            data = base64.b64decode(data).decode()
        ctx.load_verify_locations(cadata=data)
    if info.certificate_path and info.private_key_path:
        ctx.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return ctx


def _core(namespace: str | None, plural: str) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"


def _clora(namespace: str, plural: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"


class KubeClient:
    """A small async Kubernetes API client over the credentials kopf uses."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo) -> KubeClient:
        headers: dict[str, str] = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = httpx.BasicAuth(info.username, info.password or "") if info.username else None
        http = httpx.AsyncClient(
            base_url=info.server,
            headers=headers,
            auth=auth,
            verify=_ssl_context(info) if info.server.startswith("https") else True,
            timeout=httpx.Timeout(30.0, connect=10.0),
        )
        return cls(http)

    @classmethod
    def connect(cls, settings: kopf.OperatorSettings, logger: logging.Logger) -> KubeClient:
        """The in-cluster service account if there is one, else the kubeconfig (as kopf does)."""
        info = kopf.login_with_service_account(settings=settings, logger=logger) or (
            kopf.login_with_kubeconfig(settings=settings, logger=logger)
        )
        if info is None:
            raise kopf.PermanentError("no Kubernetes credentials: neither a service account nor a kubeconfig")
        return cls.from_connection(info)

    async def close(self) -> None:
        await self._http.aclose()

    # Plain verbs.

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        rsp = await self._http.request(method, path, **kwargs)
        if rsp.status_code >= 400 and rsp.status_code != 404:
            raise KubeError(rsp.status_code, rsp.text)
        return rsp

    async def get(self, path: str) -> dict[str, Any] | None:
        rsp = await self._request("GET", path)
        return None if rsp.status_code == 404 else rsp.json()

    async def list(self, path: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        rsp = await self._request("GET", path, params=params)
        items: list[dict[str, Any]] = [] if rsp.status_code == 404 else rsp.json().get("items") or []
        if labels:
            # Filter here too: a selector the server ignored must not widen the answer.
            items = [
                i
                for i in items
                if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())
            ]
        return items

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Creates the object; None if one of that name exists already (creation is idempotent)."""
        try:
            rsp = await self._request("POST", path, json=body)
        except KubeError as e:
            if e.status == 409:
                return None
            raise
        return rsp.json()

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        headers = {"Content-Type": "application/merge-patch+json"}
        rsp = await self._request("PATCH", path, json=patch, headers=headers)
        return None if rsp.status_code == 404 else rsp.json()

    async def delete(self, path: str) -> bool:
        """Deletes the object; False if it was gone already."""
        rsp = await self._request("DELETE", path)
        return rsp.status_code != 404

    # clora's objects.

    async def get_runtime(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get(f"{_clora(namespace, RUNTIME_PLURAL)}/{name}")

    async def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get(f"{_clora(namespace, EXPERIMENT_PLURAL)}/{name}")

    async def patch_experiment_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        """False when the experiment is gone."""
        path = f"{_clora(namespace, EXPERIMENT_PLURAL)}/{name}/status"
        return await self.merge_patch(path, {"status": patch}) is not None

    async def patch_runtime_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        path = f"{_clora(namespace, RUNTIME_PLURAL)}/{name}/status"
        return await self.merge_patch(path, {"status": patch}) is not None

    async def list_nodes(self) -> list[dict[str, Any]]:
        return await self.list(_core(None, "nodes"))

    async def list_runtime_pods(self, namespace: str, runtime: str) -> list[dict[str, Any]]:
        return await self.list(_core(namespace, "pods"), labels={LABEL_RUNTIME: runtime})

    async def create_pod(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self.create(_core(namespace, "pods"), body)

    async def delete_pod(self, namespace: str, name: str) -> bool:
        return await self.delete(f"{_core(namespace, 'pods')}/{name}")

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get(f"{_core(namespace, 'configmaps')}/{name}")

    async def read_token(self, namespace: str, name: str) -> str | None:
        """The token in a runtime's Secret, or None if the Secret does not exist."""
        secret = await self.get(f"{_core(namespace, 'secrets')}/{name}")
        if secret is None:
            return None
        data = (secret.get("data") or {}).get(TOKEN_SECRET_KEY)
        if data:
            return base64.b64decode(data).decode()
        # An API server turns stringData into data; an emulator may keep it as written.
        return (secret.get("stringData") or {}).get(TOKEN_SECRET_KEY)

    async def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self.create(_core(namespace, "secrets"), body)


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
