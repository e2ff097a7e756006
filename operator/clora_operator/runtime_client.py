"""Async HTTP client of one runtime pod's API (DESIGN.md, "Runtime HTTP API")."""

from __future__ import annotations

from typing import Any

import httpx

from clora.api import LoRAExperimentSpec
from clora.api.runtime_api import (
    DeleteExperimentResponse,
    ExperimentList,
    ExperimentState,
    PutExperimentRequest,
)


class RuntimeUnavailable(Exception):
    """The pod did not answer, or answered with a server error: try again or treat it as lost."""


class RuntimeRejected(Exception):
    """The pod refused the request (4xx): the experiment, not the pod, is at fault."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class RuntimeClient:
    """One shared connection pool; each call names the pod's base URL and the pool's token."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=3.0))

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, url: str, token: str, **kwargs: Any) -> httpx.Response:
        try:
            rsp = await self._http.request(
                method, url, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
        except httpx.HTTPError as e:
            raise RuntimeUnavailable(f"{method} {url}: {type(e).__name__}: {e}") from e
        if rsp.status_code >= 500:
            raise RuntimeUnavailable(f"{method} {url}: HTTP {rsp.status_code}: {rsp.text[:300]}")
        if rsp.status_code >= 400 and rsp.status_code != 404:
            try:
                detail = str(rsp.json().get("detail"))
            except ValueError:
                detail = rsp.text[:300]
            raise RuntimeRejected(rsp.status_code, detail)
        return rsp

    async def list(self, base: str, token: str) -> ExperimentList:
        rsp = await self._call("GET", f"{base}/v1/experiments", token)
        return ExperimentList.model_validate(rsp.json())

    async def put(
        self,
        base: str,
        token: str,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        resume_from: str | None,
        verifier_token: str | None = None,
        dataset_text: str | None = None,
    ) -> ExperimentState:
        request = PutExperimentRequest(
            spec=spec, resume_from=resume_from, verifier_token=verifier_token, dataset_text=dataset_text
        )
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        rsp = await self._call("PUT", f"{base}/v1/experiments/{namespace}/{name}", token, json=body)
        if rsp.status_code == 404:
            raise RuntimeRejected(404, rsp.text[:300])
        return ExperimentState.model_validate(rsp.json())

    async def delete(
        self, base: str, token: str, namespace: str, name: str
    ) -> DeleteExperimentResponse | None:
        """Checkpoints and removes the experiment; None when the pod does not have it."""
        rsp = await self._call("DELETE", f"{base}/v1/experiments/{namespace}/{name}", token)
        if rsp.status_code == 404:
            return None
        return DeleteExperimentResponse.model_validate(rsp.json())

    async def ready(self, base: str) -> bool:
        try:
            rsp = await self._http.get(f"{base}/readyz")
        except httpx.HTTPError:
            return False
        return rsp.status_code == 200
