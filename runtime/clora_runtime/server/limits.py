"""What one client may take of the runtime's HTTP server: bodies, connections, time (issue 17).

Every limit is a field of ServerLimits, with its default here and only here; `clora runtime` has one
flag per field (--max-body-bytes for max_body_bytes, ...), generated from the model as the engine's are.

uvicorn bounds idle keep-alive connections (timeout_keep_alive) but neither how long a client may take
to send its request's headers nor how many connections it may hold, so an unauthenticated client with
enough idle or half-sent connections used every file descriptor and the kubelet's probes timed out.
GuardedH11Protocol adds both. The connection cap does not answer 503 to newcomers, as uvicorn's
limit_concurrency would (the probes included): at the cap, a new connection evicts the oldest one that
has no request in flight, so that a probe, which sends its request as soon as it connects, is served.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from clora.api.runtime_api import ErrorResponse, PutExperimentRequest

log = logging.getLogger(__name__)

MiB = 2**20
# File descriptors the process needs besides client connections (model files, logs, Ray's pipes).
FD_HEADROOM = 256


def _max_length(model: type[BaseModel], field: str) -> int:
    return next(int(m.max_length) for m in model.model_fields[field].metadata if hasattr(m, "max_length"))


# A PUT may carry a ConfigMap dataset's text (datasetText); JSON may escape each of its characters to
# six bytes (\\uXXXX), so the PUT of an experiment is allowed that much above max_body_bytes.
DATASET_TEXT_WIRE_BYTES = 6 * _max_length(PutExperimentRequest, "dataset_text")


class ServerLimits(BaseModel):
    """The HTTP server's limits (flags of `clora runtime`); the defaults are the documented ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        1 * MiB,
        ge=1024,
        description="Largest request body in bytes; larger answer 413. The PUT of an experiment may"
        f" also carry a ConfigMap dataset (datasetText): it is allowed {DATASET_TEXT_WIRE_BYTES} bytes more.",
    )
    max_connections: int = Field(
        512,
        ge=8,
        description="Open client connections at most; at the cap a new connection closes the oldest one"
        " without a request in flight (lowered at start-up to fit the open-files limit).",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has, once connected (or after its last answer), to send a"
        " request's complete headers; then the connection is closed.",
    )
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds a request's whole body may take to arrive; then it answers 408."
    )
    keep_alive_timeout: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection stays open after an answer."
    )
    tick_deadline: float = Field(
        600.0,
        gt=0,
        description="Seconds a tick may run before /healthz and /readyz answer 503 (stalled), so that"
        " Kubernetes restarts the pod; a tick with nothing to do ends at once.",
    )

    def body_limit(self, method: str, path: str) -> int:
        """The body cap of one request."""
        if method == "PUT" and path.startswith("/v1/experiments/"):
            return self.max_body_bytes + DATASET_TEXT_WIRE_BYTES
        return self.max_body_bytes

    def fitted_to_open_files(self) -> ServerLimits:
        """These limits with max_connections lowered, if needed, below the process's open-files limit
        (raised to its hard limit first): a connection refused for lack of a descriptor cannot be
        evicted, and the probes would starve."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.max_connections + FD_HEADROOM
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new_soft = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft < wanted:
            fitted = max(8, soft - FD_HEADROOM)
            log.warning(
                "--max-connections %d lowered to %d: the open-files limit is %d",
                self.max_connections,
                fitted,
                soft,
            )
            return self.model_copy(update={"max_connections": fitted})
        return self


def guarded_protocol(limits: ServerLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header timeout and the connection cap of `limits`."""

    class GuardedH11Protocol(_GuardedH11):
        _limits = limits

    return GuardedH11Protocol


class _GuardedH11(H11Protocol):
    _limits: ClassVar[ServerLimits]
    _opened: float = 0.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._opened = self.loop.time()
        full = self._make_room()
        super().connection_made(transport)
        if full:
            log.warning("%d connections, none idle: refusing one", len(self.connections))
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if not self._in_request() and self._header_timer is None:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._in_request():
            self._cancel_header_timer()  # headers complete: the app (and body_timeout) take over

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> bool:
        """At the cap, close the oldest connection without a request in flight; True when every open
        connection has one (this new connection is then refused)."""
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) < self._limits.max_connections:
            return False
        idle = [c for c in live if isinstance(c, _GuardedH11) and not c._in_request()]
        if not idle:
            return True
        oldest = min(idle, key=lambda c: c._opened)
        oldest.transport.close()
        return False


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(detail=detail).model_dump(), status_code=status)


class BodyLimit:
    """Pure ASGI middleware: reads the request body within its cap and body_timeout, then hands it
    on. 413 names the cap (before reading, when Content-Length already says); 408 when it is late."""

    def __init__(self, app: Callable[..., Awaitable[None]], limits: ServerLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.body_limit(scope["method"], scope["path"])
        too_large = _error(413, f"the request body is larger than this runtime's limit of {limit} bytes")
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await too_large(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            seconds = self.limits.body_timeout
            await _error(408, f"the request body did not arrive within {seconds:g} s")(scope, receive, send)
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # what follows: the client's disconnect

        await self.app(scope, replay, send)
