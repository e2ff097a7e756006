"""Fuzzes the runtime's HTTP API with schemathesis against its own /openapi.json.

Every answer must be a status the document lists for that route, with the documented body and
content type (401, 404, 409, 422 and 503 included); afterwards the server must still be healthy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from runtime_server import RuntimeServer, running_runtime_server
from schemathesis.checks import positive_data_acceptance

MAX_EXAMPLES = 25
# Not checked: "a schema-valid request is accepted". What the schema cannot say is still refused with
# 422 by design (a dataset file that does not exist, path xor configMap, a target module the model
# lacks), and 409 answers for full slots depend on what the fuzzer added before.


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    # A small per-tick budget keeps what the fuzzer adds cheap to train.
    args = ["--max-adapters", "4", "--max-rank", "16", "--tokens-per-tick", "256"]
    with running_runtime_server(tmp_path_factory.mktemp("fuzz"), extra_args=args) as server:
        yield server


def test_api_answers_only_documented_statuses(fuzzed_server: RuntimeServer) -> None:
    # Driven by hand rather than schemathesis.pytest: its plugin does not run under pytest 9.
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", headers=fuzzed_server.headers)
    schema.config.base_url = fuzzed_server.url
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /v1/experiments",
        "PUT /v1/experiments/{namespace}/{name}",
        "DELETE /v1/experiments/{namespace}/{name}",
        "POST /v1/experiments/{namespace}/{name}/samples",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=fuzzed_server.headers, timeout=60, excluded_checks=[positive_data_acceptance]
            )

        fuzz()


def test_server_still_healthy_after_fuzzing(fuzzed_server: RuntimeServer, tmp_path: Path) -> None:
    # Runs after the fuzz cases (file order): the process is alive, ready, and still answers.
    assert fuzzed_server.process.poll() is None
    assert httpx.get(f"{fuzzed_server.url}/healthz").status_code == 200
    assert httpx.get(f"{fuzzed_server.url}/readyz").status_code == 200
    with fuzzed_server.client() as api:
        assert api.get("/v1/experiments").status_code == 200
