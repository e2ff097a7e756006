"""Test harness for the operator: the KMock Kubernetes emulator, a kubelet stand-in that runs real
`clora runtime` processes for the pods the operator creates, and the operator itself, in-process.

The emulator (kmock.KubernetesEmulator) stores objects and serves watches, but plays no
controller: no resourceVersion/uid/creationTimestamp of its own (set here on what tests create),
no label selectors, no garbage collection, no scheduler, no kubelet. `Kubelet` below is the
scheduler and kubelet: it binds each runtime pod to the node of its affinity, gives it its own
loopback address as podIP (127.x.y.2, .3, ...), mounts its token Secret as a file, starts the
container's own command line as a local process bound to that address, and reports the pod
Running and Ready once /readyz answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kmock
from aiohttp import web

from clora.constants import (
    EXPERIMENT_KIND,
    EXPERIMENT_PLURAL,
    EXPERIMENT_SHORT,
    GROUP,
    RUNTIME_KIND,
    RUNTIME_PLURAL,
    RUNTIME_PORT,
    RUNTIME_SHORT,
    TOKEN_FILE_ENV,
    TOKEN_SECRET_KEY,
    VERSION,
)
from clora_operator.pods import is_runtime_pod, pod_info

RUNTIMES = f"{GROUP}/{VERSION}/{RUNTIME_PLURAL}"
EXPERIMENTS = f"{GROUP}/{VERSION}/{EXPERIMENT_PLURAL}"
NS = "clora-test"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StampingEmulator(kmock.KubernetesEmulator):
    """The emulator, plus what the API server stamps on every object: uid, creationTimestamp,
    generation (bumped by spec changes) and a resourceVersion that changes on every write
    (kopf's JSON patches test it, and it checks its own writes came back by it)."""

    _counter: int = 0

    def _next_version(self) -> str:
        StampingEmulator._counter += 1
        return str(StampingEmulator._counter)

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self._next_version()
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            asked = ((data.get("metadata") or {}) if isinstance(data, dict) else {}).get("resourceVersion")
            stored = self._stored_version(request)
            if asked and stored and asked != stored:
                # Optimistic concurrency, as the API server does it for a write naming a version.
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message=f"the object has been modified ({asked} != {stored})",
                )
            version = self._next_version()
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {}) if data.get("metadata") is not None else {}
                data["metadata"] = {**meta, "resourceVersion": version}
                if "spec" in data and not request.subresource:
                    data["metadata"]["generation"] = self._generation(request) + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            # The API server answers a failed `test` (a stale resourceVersion) with 422, which
            # kopf takes as "newer changes pending, retry on the next cycle".
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(StampingEmulator._counter)
        return result

    async def _serve_watch(self, request: Any) -> Any:
        # The emulator replays every stored object when a watch starts; an API server sends only
        # what changed after the listed resourceVersion. Replays would look like stale events.
        since = request.params.get("resourceVersion", "")
        floor = int(since) if since.isdigit() else 0
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED":
                version = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion", "")
                if version.isdigit() and int(version) <= floor:
                    continue
            yield event

    def _stored(self, request: Any) -> dict[str, Any]:
        """The metadata of the object a request names, as stored ({} if there is none)."""
        for (res, ns, name), obj in list(self.objects.items()):
            if (
                res == request.resource
                and ns == request.namespace
                and name == request.name
                and not obj.deleted
            ):
                return obj.raw.get("metadata") or {}
        return {}

    def _stored_version(self, request: Any) -> str | None:
        return self._stored(request).get("resourceVersion")

    def _generation(self, request: Any) -> int:
        return int(self._stored(request).get("generation") or 1)


def lora_runtime(name: str, **spec: Any) -> dict[str, Any]:
    """A LoRARuntime manifest on the tiny model in the test namespace; `spec` adds or overrides fields."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": RUNTIME_KIND,
        "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": "tiny", **spec},
    }


class Cluster:
    """The emulator plus the client calls a user (or kubectl) would make."""

    def __init__(self, emulator: kmock.KubernetesEmulator, url: str) -> None:
        self.emulator = emulator
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    @staticmethod
    def declare(emulator: kmock.KubernetesEmulator) -> None:
        emulator.resources.load_bundled()
        for plural, kind, short in (
            (RUNTIME_PLURAL, RUNTIME_KIND, RUNTIME_SHORT),
            (EXPERIMENT_PLURAL, EXPERIMENT_KIND, EXPERIMENT_SHORT),
        ):
            emulator.resources[f"{GROUP}/{VERSION}/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=True,
                shortnames={short},
                categories={"clora"},
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                subresources={"status"},
            )

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "test", "namespace": NS},
                        }
                    ],
                }
            )
        )
        return path

    @staticmethod
    def path(resource: str, namespace: str | None, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        out = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return f"{out}/{name}" if name else out

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        """Creates the object (the emulator stamps uid, resourceVersion, generation, creation time)."""
        rsp = await self.http.post(
            self.path(resource, (body.get("metadata") or {}).get("namespace")), json=body
        )
        rsp.raise_for_status()
        return rsp.json()

    async def patch(self, resource: str, namespace: str | None, name: str, patch: dict[str, Any]) -> None:
        rsp = await self.http.patch(
            self.path(resource, namespace, name),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        rsp.raise_for_status()

    async def delete(self, resource: str, namespace: str | None, name: str) -> None:
        rsp = await self.http.delete(self.path(resource, namespace, name))
        rsp.raise_for_status()

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object (straight from the emulator's memory), or None."""
        for (res, ns, n), obj in list(self.emulator.objects.items()):
            if res == kmock.resource(resource) and ns == namespace and n == name and not obj.deleted:
                return obj.raw
        return None

    def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            obj.raw
            for (res, ns, _), obj in list(self.emulator.objects.items())
            if res == kmock.resource(resource) and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        """Events posted about the object `name` (any kind), optionally of one reason."""
        return [
            e
            for e in self.list("v1/events")
            if (e.get("involvedObject") or {}).get("name") == name
            and (reason is None or e.get("reason") == reason)
        ]

    def runtime_status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        return (self.get(RUNTIMES, namespace, name) or {}).get("status") or {}

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        return (self.get(EXPERIMENTS, namespace, name) or {}).get("status") or {}

    async def wait_for(
        self, what: str, check: Callable[[], Any], timeout: float = 120, interval: float = 0.1
    ) -> Any:
        """Waits until check() is truthy; returns its value. Fails the test with `what` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}")
            await asyncio.sleep(interval)

    async def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        await self.create(
            "v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}},
        )

    async def close(self) -> None:
        await self.http.aclose()


@dataclass
class RuntimeProcess:
    pod: str
    ip: str
    process: subprocess.Popen[bytes]
    log: Path
    token_file: Path
    url: str
    """The runtime's own address (behind the pod's DelayProxy when the kubelet proxies)."""


@dataclass
class DelayProxy:
    """A loopback reverse proxy where a runtime pod's API is (podIP:RUNTIME_PORT), in front of the
    real runtime: a test makes its answers slow, to play a hung runtime or a slow DELETE."""

    ip: str
    target: str
    delay: float = 0.0
    """Seconds every request but /readyz waits before it is forwarded (a hung runtime)."""
    delete_delays: list[float] = field(default_factory=list)
    """The answers to the next DELETEs wait this long each, after the runtime has acted on them."""
    seen: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every request, in order."""
    _runner: web.AppRunner | None = None
    _http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(base_url=self.target, timeout=120)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.ip, RUNTIME_PORT).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.aclose()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        self.seen.append((request.method, request.path))
        if request.path != "/readyz" and self.delay:
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            rsp = await self._http.request(
                request.method, request.path_qs, content=await request.read(), headers=headers
            )
        except httpx.HTTPError as e:  # the runtime behind is gone: what a dead pod's proxy would say
            return web.Response(status=502, text=f"{type(e).__name__}: {e}")
        if request.method == "DELETE" and self.delete_delays:
            await asyncio.sleep(self.delete_delays.pop(0))
        return web.Response(
            status=rsp.status_code,
            body=rsp.content,
            content_type=rsp.headers.get("content-type", "").split(";")[0] or None,
        )


@dataclass
class Kubelet:
    """Scheduler and kubelet for runtime pods: one local `clora runtime` process per pod."""

    cluster: Cluster
    workdir: Path
    ip_prefix: str
    """First three octets of the pods' loopback addresses, e.g. '127.23.0'."""
    env: dict[str, str] = field(default_factory=dict)
    proxied: bool = False
    """Put a DelayProxy at each pod's address, in front of its runtime (`proxies`, by pod name)."""
    processes: dict[str, RuntimeProcess] = field(default_factory=dict)
    proxies: dict[str, DelayProxy] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    """pod name -> time.monotonic() its runtime became ready."""
    _next_ip: int = 2
    _task: asyncio.Task[None] | None = None
    _starting: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _dead: set[str] = field(default_factory=set)

    async def __aenter__(self) -> Kubelet:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for proc in self.processes.values():
            _stop(proc.process)
        for proxy in self.proxies.values():
            await proxy.stop()

    def kill(self, pod: str) -> None:
        """The runtime process dies (as if OOM-killed); the pod stays, not ready."""
        proc = self.processes[pod]
        proc.process.kill()
        proc.process.wait()

    async def _loop(self) -> None:
        while True:
            try:
                await self._pass()
            except Exception as e:  # a broken pass must not stop the kubelet; say why
                print(f"kubelet pass failed: {type(e).__name__}: {e}", file=sys.stderr)
            await asyncio.sleep(0.2)

    async def _pass(self) -> None:
        pods = {
            p["metadata"]["name"]: p
            for p in self.cluster.list("v1/pods")
            if is_runtime_pod((p.get("metadata") or {}).get("labels") or {})
        }
        for name, body in pods.items():
            meta = body["metadata"]
            if meta.get("deletionTimestamp"):
                await self._remove(name, body)
            elif name not in self.processes and name not in self._starting:
                self._starting.add(name)
                self._tasks.add(asyncio.create_task(self._start(name, body)))
            elif (
                name in self.processes
                and name not in self._dead
                and self.processes[name].process.poll() is not None
            ):
                self._dead.add(name)
                await self._report_dead(body)
        for name in set(self.processes) - set(pods):
            await self._remove(name, {})

    async def _start(self, name: str, body: dict[str, Any]) -> None:
        try:
            info = pod_info(body)
            ip = f"{self.ip_prefix}.{self._next_ip}"
            self._next_ip += 1
            ns = body["metadata"]["namespace"]
            # Bind to the node, as the scheduler would.
            await self.cluster.patch("v1/pods", ns, name, {"spec": {"nodeName": info.node}})
            container = body["spec"]["containers"][0]
            secret_name = next(v["secret"]["secretName"] for v in body["spec"]["volumes"] if "secret" in v)
            secret = await self.cluster.wait_for(
                f"Secret {secret_name}", lambda: self.cluster.get("v1/secrets", ns, secret_name), timeout=30
            )
            token = (secret.get("stringData") or {}).get(TOKEN_SECRET_KEY)
            token_file = self.workdir / f"{name}.token"
            token_file.write_text(token)
            args = list(container["args"])
            args[args.index("--host") + 1] = ip
            # The tests' datasets lie in their tmp folder, which stands for a mounted dataset volume.
            if "--dataset-roots" in args:
                at = args.index("--dataset-roots") + 1
                args[at] = os.pathsep.join([args[at], str(self.workdir)])
            else:
                args += ["--dataset-roots", str(self.workdir)]
            own_url = f"http://{ip}:{RUNTIME_PORT}"
            if self.proxied:
                args[args.index("--port") + 1] = str(RUNTIME_PORT + 1)
                own_url = f"http://{ip}:{RUNTIME_PORT + 1}"
                self.proxies[name] = DelayProxy(ip=ip, target=own_url)
                await self.proxies[name].start()
            log = self.workdir / f"{name}.log"
            env = {**os.environ, **self.env, TOKEN_FILE_ENV: str(token_file)}
            process = subprocess.Popen(
                [sys.executable, "-m", "clora.cli", *args],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self.processes[name] = RuntimeProcess(
                pod=name, ip=ip, process=process, log=log, token_file=token_file, url=own_url
            )
            await self.cluster.patch(
                "v1/pods",
                ns,
                name,
                {"status": {"phase": "Pending", "podIP": ip, "hostIP": ip, "startTime": _now()}},
            )
            url = f"http://{ip}:{RUNTIME_PORT}/readyz"
            async with httpx.AsyncClient(timeout=2) as http:
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"runtime for {name} exited: {log.read_text()[-2000:]}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(url)).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
            self.started[name] = time.monotonic()
            await self.cluster.patch("v1/pods", ns, name, {"status": _running_status(ip, ready=True)})
        finally:
            self._starting.discard(name)

    async def _report_dead(self, body: dict[str, Any]) -> None:
        ip = self.processes[body["metadata"]["name"]].ip
        status = _running_status(ip, ready=False)
        status["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
        await self.cluster.patch(
            "v1/pods", body["metadata"]["namespace"], body["metadata"]["name"], {"status": status}
        )

    async def _remove(self, name: str, body: dict[str, Any]) -> None:
        proc = self.processes.pop(name, None)
        if proc is not None:
            _stop(proc.process)  # SIGTERM: the runtime checkpoints and exits
        proxy = self.proxies.pop(name, None)
        if proxy is not None:
            await proxy.stop()


def _running_status(ip: str, *, ready: bool) -> dict[str, Any]:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag, "lastTransitionTime": _now()},
        ],
        "containerStatuses": [
            {
                "name": "runtime",
                "image": "clora-runtime",
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "state": {"running": {}},
            }
        ],
    }


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def local_kubelet(cluster: Cluster, workdir: Path, second_octet: int, *, proxied: bool = False) -> Kubelet:
    """A Kubelet whose pods get addresses 127.<second_octet + pid>.<pid>.N (no clash between test
    processes), running each runtime on one thread."""
    pid = os.getpid()
    return Kubelet(
        cluster=cluster,
        workdir=workdir,
        ip_prefix=f"127.{second_octet + pid % 50}.{pid // 100 % 250}",
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CLORA_LOG_LEVEL": "warning"},
        proxied=proxied,
    )


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    emulator = StampingEmulator()
    Cluster.declare(emulator)
    async with emulator, kmock.Server(emulator) as server:
        cluster = Cluster(emulator, str(server.url).rstrip("/"))
        # No Namespace object: the emulator cannot parse /api/v1/namespaces paths, and kopf
        # watching named namespaces does not need one.
        try:
            yield cluster
        finally:
            await cluster.close()


@contextlib.asynccontextmanager
async def running_operator(config: Any) -> AsyncIterator[None]:
    """kopf with clora's handlers in this event loop, stopped on exit."""
    from clora_operator.main import run

    stop = asyncio.Event()
    task = asyncio.create_task(run(config, stop_flag=stop))
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False
