"""The runtime's HTTP API (DESIGN.md, "Runtime HTTP API"): routes, bearer auth, error answers.

Routes only validate and call the engine's thread-safe methods, none of which waits for a running
tick: PUT admits into a free slot at once, DELETE removes at once or answers 202 while the tick that
holds the experiment finishes (docs/runtime-api.md). Every engine route is a plain `def`, which
FastAPI runs on its thread pool, so a slow call (a checkpoint write) never stalls the event loop. The
probes are `async def` and read only the loop's state: they never wait for the engine's locks or for
a thread of that pool, which slow calls may fill.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Literal, Protocol, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from clora.api.experiment_types import LoRAExperimentSpec
from clora.api.runtime_api import (
    DeleteExperimentResponse,
    ErrorResponse,
    ExperimentList,
    ExperimentState,
    PushSamplesRequest,
    PushSamplesResponse,
    PutExperimentRequest,
    RemovedExperiment,
    RolloutList,
    Sample,
)
from clora_runtime.server.auth import bearer_matches
from clora_runtime.server.errors import client_file_error, describe
from clora_runtime.server.limits import BodyLimit, ServerLimits
from clora_runtime.server.loop import LoopState

log = logging.getLogger(__name__)
T = TypeVar("T")

# Kubernetes object names: a namespace is a DNS-1123 label, a LoRAExperiment a DNS-1123 subdomain.
# Checking them here also keeps both safe as path components under the checkpoint directory.
Namespace = Annotated[str, Path(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
Name = Annotated[str, Path(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]

# Paths a kubelet probes without credentials; everything else needs the bearer token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


class EngineAPI(Protocol):
    """The thread-safe part of the engine the routes call: clora_runtime.engine.Engine, or a pod's
    replicas together (clora_runtime.replicas.ReplicaSet)."""

    config: Any  # EngineConfig: tokens_per_tick is read

    def upsert(
        self,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        resume_from: str | None = None,
        verifier_token: str | None = None,
        dataset_text: str | None = None,
    ) -> ExperimentState: ...
    def remove(self, namespace: str, name: str) -> DeleteExperimentResponse: ...
    def push_samples(self, namespace: str, name: str, samples: list[Sample]) -> int: ...
    def states(self) -> list[ExperimentState]: ...
    def removed(self) -> list[RemovedExperiment]: ...
    def rollouts(self, namespace: str, name: str, step: int | None = None) -> RolloutList: ...
    def state(self, namespace: str, name: str) -> ExperimentState: ...


class LoopView(Protocol):
    """What the routes read of the tick loop(s): server.loop.TickLoop, or replicas.ReplicaLoops."""

    state: LoopState
    error: str | None
    loaded: bool
    ready: bool  # /readyz: RUNNING, not stalled, and for several replicas every one of them up
    stalled: str | None  # why the running tick is past the tick deadline, or None

    def wake(self) -> None: ...


class Health(BaseModel):
    """Answer of /healthz and /readyz."""

    status: Literal["loading", "running", "stopping", "stopped", "dead", "stalled"]
    detail: str = ""


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(detail=detail).model_dump(), status_code=status, headers=headers)


def _doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give, all with the ErrorResponse body."""
    text = {
        401: "Missing or wrong bearer token.",
        404: "No such experiment on this runtime.",
        413: "The request body is larger than the runtime's limit (--max-body-bytes); the detail says it.",
        409: "Refused: every slot is taken, the rank is above maxRank, a step needs more tokens than"
        " tokensPerTick, or an immutable field (runtime, lora) changed; the detail says which.",
        422: "The request is malformed; the detail names the field.",
        503: "The runtime is not ready: the base model is still loading, or the engine stopped.",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


class BearerAuth:
    """Pure ASGI middleware: checks the token before anything else reads the request.

    As middleware (not a dependency) it answers 401 before the body is parsed, so an unauthenticated
    client learns nothing, not even whether its body would validate, and unknown paths are covered.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            header = next(
                (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None
            )
            if not bearer_matches(header, self.token):
                detail = "missing bearer token" if header is None else "wrong bearer token"
                response = _error(401, detail, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: EngineAPI,
    loop: LoopView,
    exposition: Callable[[], bytes],
    *,
    token: str | None,
    conflict: type[Exception],
    not_found: type[Exception],
    unavailable: type[Exception] | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The FastAPI app of one runtime. `token=None` serves without auth (local use only).
    `exposition` answers /metrics (RuntimeMetrics.exposition, or the replicas' merged).

    `conflict`/`not_found` are the engine's ExperimentConflict/ExperimentNotFound, passed in so this
    module does not import the engine (and torch) and can be tested on its own; `unavailable` (503) is
    raised for an experiment whose replica is restarting. `limits`: the body cap and timeout.
    """
    app = FastAPI(
        title="clora runtime",
        version="v1",
        description="One warm runtime pod: trains many LoRA experiments on one shared base model.",
        docs_url=None,
        redoc_url=None,
    )
    # The last added runs first: the token is checked before any body is read.
    app.add_middleware(BodyLimit, limits=limits or ServerLimits())
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    # Documents the scheme in /openapi.json; the middleware above enforces it.
    bearer = [Depends(HTTPBearer(auto_error=False))] if token is not None else []
    auth = (401,) if token is not None else ()

    def require(*, running: bool) -> None:
        if not loop.loaded:
            raise _NotReady(loop.error or "the base model is still loading")
        if running and loop.state != LoopState.RUNNING:
            raise _NotReady(loop.error or f"the engine loop is {loop.state.value}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, describe(exc.errors()))

    @app.exception_handler(_Unprocessable)
    async def _unprocessable(_: Request, exc: _Unprocessable) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(conflict)
    async def _conflict(_: Request, exc: Exception) -> JSONResponse:
        return _error(409, str(exc) or "conflict")

    @app.exception_handler(not_found)
    async def _not_found(_: Request, exc: Exception) -> JSONResponse:
        # KeyError's str() quotes its argument; the message is what people should read.
        return _error(404, str(exc.args[0]) if exc.args else "experiment not found")

    @app.exception_handler(_NotReady)
    async def _not_ready(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})

    if unavailable is not None:
        app.add_exception_handler(unavailable, _not_ready)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a route")
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/healthz", tags=["probes"], responses={503: {"model": Health}})
    async def healthz() -> Response:
        """Liveness: fails when the engine loop died or its running tick is past the tick deadline
        (--tick-deadline), so that the pod is restarted."""
        if loop.state == LoopState.DEAD:
            return JSONResponse(Health(status="dead", detail=loop.error or "").model_dump(), 503)
        stalled = loop.stalled
        if stalled is not None:
            return JSONResponse(Health(status="stalled", detail=stalled).model_dump(), 503)
        return JSONResponse(Health(status=loop.state.value).model_dump(), 200)

    @app.get("/readyz", tags=["probes"], responses={503: {"model": Health}})
    async def readyz() -> Response:
        """Readiness: the base model is loaded, the tick loop is running and not stalled."""
        stalled = loop.stalled
        if stalled is not None and loop.state == LoopState.RUNNING:
            return JSONResponse(Health(status="stalled", detail=stalled).model_dump(), 503)
        body = Health(status=loop.state.value, detail=loop.error or "")
        return JSONResponse(body.model_dump(), 200 if loop.ready else 503)

    @app.get(
        "/metrics",
        tags=["probes"],
        dependencies=bearer,
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}}
        | _doc(*auth),
    )
    def prometheus_metrics() -> Response:
        """Every clora_ runtime metric (clora/metrics.py) in the Prometheus text format."""
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/experiments", tags=["experiments"], dependencies=bearer, responses=_doc(*auth, 503))
    def list_experiments() -> ExperimentList:
        """Every experiment's status in one answer: what the operator polls."""
        require(running=False)
        return ExperimentList(experiments=engine.states(), removed=engine.removed())

    @app.get(
        "/v1/experiments/{namespace}/{name}",
        tags=["experiments"],
        dependencies=bearer,
        responses=_doc(*auth, 404, 422, 503),
    )
    def get_experiment(namespace: Namespace, name: Name) -> ExperimentState:
        """One experiment's status."""
        require(running=False)
        return engine.state(namespace, name)

    @app.put(
        "/v1/experiments/{namespace}/{name}",
        tags=["experiments"],
        dependencies=bearer,
        responses=_doc(*auth, 409, 413, 422, 503),
    )
    def put_experiment(namespace: Namespace, name: Name, body: PutExperimentRequest) -> ExperimentState:
        """Adds an experiment, or updates its mutable fields (learningRate, steps, suspend, ...).

        Idempotent: the same spec again changes nothing. Changes apply at the next tick. A change of
        an immutable field (runtime, lora), a full runtime or a rank above maxRank answer 409.
        """
        require(running=True)
        budget = engine.config.tokens_per_tick
        if body.spec.tokens_per_tick() > budget:
            # Also keeps one client's request from tying up (or exhausting) the whole runtime.
            raise conflict(
                f"{namespace}/{name}: spec.training promptsPerStep x groupSize x maxNewTokens ="
                f" {body.spec.tokens_per_tick()} tokens per step, above this runtime's tokensPerTick {budget}"
            )
        dataset = body.spec.task.dataset
        state = _checked(
            lambda: engine.upsert(
                namespace, name, body.spec, body.resume_from, body.verifier_token, body.dataset_text
            ),
            # The paths the client chose: an error reading them is its bad field, not a server fault.
            files={"resumeFrom": body.resume_from, "spec.task.dataset.path": dataset and dataset.path},
        )
        loop.wake()
        return state

    @app.delete(
        "/v1/experiments/{namespace}/{name}",
        tags=["experiments"],
        dependencies=bearer,
        responses={
            202: {
                "model": DeleteExperimentResponse,
                "description": "Removing: the running tick"
                " holds the experiment; its final checkpoint is written when the tick ends. DELETE"
                " again (or read `removed` of GET /v1/experiments) to learn it.",
            }
        }
        | _doc(*auth, 404, 422, 503),
    )
    def delete_experiment(namespace: Namespace, name: Name) -> Response:
        """Checkpoints the experiment and frees its slot (200, with the final checkpoint), or, when the
        running tick holds it, marks it Removing and answers 202 at once. Never waits for a tick; a
        DELETE of an experiment removed recently answers 200 with its final checkpoint again."""
        require(running=False)
        answer = engine.remove(namespace, name)  # the engine drops the experiment's series
        loop.wake()
        return JSONResponse(answer.model_dump(mode="json", by_alias=True), 200 if answer.removed else 202)

    @app.get(
        "/v1/experiments/{namespace}/{name}/rollouts",
        tags=["experiments"],
        dependencies=bearer,
        responses=_doc(*auth, 404, 422, 503),
    )
    def get_rollouts(
        namespace: Namespace,
        name: Name,
        step: Annotated[int | None, Query(ge=0, description="The step; omitted: the newest kept")] = None,
    ) -> RolloutList:
        """The completions of one recent step with their prompts, rewards, advantages and the
        sampler's and the trainer's log-probabilities. The runtime keeps the last few steps of each
        experiment (`steps` lists them); an older step answers 404."""
        require(running=False)
        return engine.rollouts(namespace, name, step)

    @app.post(
        "/v1/experiments/{namespace}/{name}/samples",
        tags=["experiments"],
        dependencies=bearer,
        responses=_doc(*auth, 404, 413, 422, 503),
    )
    def push_samples(namespace: Namespace, name: Name, body: PushSamplesRequest) -> PushSamplesResponse:
        """Appends prompts (with reference answers) to a continual experiment's queue (persisted)."""
        require(running=True)
        queued = _checked(lambda: engine.push_samples(namespace, name, body.samples))
        loop.wake()
        return PushSamplesResponse(accepted=len(body.samples), queued=queued)

    return app


class _NotReady(Exception):
    """Answered 503: the engine cannot take this call now."""


class _Unprocessable(Exception):
    """Answered 422: the engine found a field it cannot accept (its ValueError names the field)."""


def _checked(call: Callable[[], T], files: dict[str, str | None] | None = None) -> T:
    """Runs an engine call; a ValueError from it is the client's bad field, and so is an OSError on
    one of `files` (field -> the path the client gave); anything else a bug."""
    try:
        return call()
    except ValidationError as e:
        raise _Unprocessable(describe(e.errors())) from e
    except ValueError as e:
        raise _Unprocessable(str(e) or "invalid value") from e
    except OSError as e:
        detail = client_file_error(e, files or {})
        if detail is None:
            raise
        raise _Unprocessable(detail) from e
