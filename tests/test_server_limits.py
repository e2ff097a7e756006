"""The runtime server as a hostile or careless client would use it (issue 17): idle and half-sent
connections, large bodies, calls that wait on the engine, a stalled tick, files the client names, and
how the server starts (a token that no header can carry, no auth off loopback).

One real `clora runtime` process on the tiny model serves the module, with the open-files limit a pod
may have (1024) and a short tick deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtime_server import RuntimeServer, free_port, running_runtime_server, wait_for

from clora.constants import TOKEN_ENV, TOKEN_FILE_ENV
from clora_runtime.server.limits import DATASET_TEXT_WIRE_BYTES, ServerLimits

OPEN_FILES = 1024  # a common soft RLIMIT_NOFILE; 1100 idle connections used to exhaust it
TICK_DEADLINE_S = 5.0
PROBE_TIMEOUT_S = 10.0  # generous: the old server did not answer at all
LIMITS = ServerLimits()


def spec(**training: Any) -> dict[str, Any]:
    base = {"steps": 1000, "learningRate": 1e-3, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4}
    return {
        "runtime": "local",
        "task": {"name": "arithmetic", "difficulty": 1},
        "lora": {"rank": 4, "alpha": 8},
        "training": {**base, **training},
        "checkpoint": {"everySteps": 1000, "keep": 2},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    args = ["--max-adapters", "4", "--max-rank", "8", "--tokens-per-tick", "256"]
    args += ["--tick-deadline", str(TICK_DEADLINE_S)]
    with running_runtime_server(
        tmp_path_factory.mktemp("limits"), extra_args=args, max_open_files=OPEN_FILES
    ) as s:
        yield s


@pytest.fixture
def api(server: RuntimeServer) -> Iterator[httpx.Client]:
    with server.client(timeout=120) as client:
        yield client


def probe(server: RuntimeServer, path: str = "/healthz") -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=PROBE_TIMEOUT_S)


def test_idle_and_half_sent_connections_do_not_starve_the_probes(server: RuntimeServer) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100 + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    sockets: list[socket.socket] = []
    try:
        for i in range(1100):
            s = socket.create_connection((server.host, server.port), timeout=30)
            if i % 2:  # half of them start a request and never finish its headers
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            sockets.append(s)
        health = probe(server)
        assert health.status_code == 200, health.text
        assert probe(server, "/readyz").status_code == 200
    finally:
        for s in sockets:
            s.close()


def test_a_request_whose_headers_never_end_is_closed(server: RuntimeServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=LIMITS.header_timeout * 6) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert s.recv(1024) == b""  # closed by the server after header_timeout, without an answer
    with socket.create_connection((server.host, server.port), timeout=LIMITS.header_timeout * 6) as s:
        assert s.recv(1024) == b""  # connected, never sent a byte


def test_bodies_are_capped(server: RuntimeServer, api: httpx.Client) -> None:
    limit = LIMITS.max_body_bytes
    samples = {"samples": [{"prompt": "x" * (limit + 1), "answer": "1"}]}
    r = api.post("/v1/experiments/body/x/samples", json=samples)
    assert r.status_code == 413, r.text
    assert str(limit) in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        yield b'{"samples": [{"prompt": "'
        for _ in range(limit // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    r = api.post(
        "/v1/experiments/body/x/samples", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and str(limit) in r.json()["detail"]
    # Without the token: 401, before any body is read.
    r = httpx.post(f"{server.url}/v1/experiments/body/x/samples", json=samples, timeout=60)
    assert r.status_code == 401
    # A PUT may carry a ConfigMap dataset as large as datasetText allows, escaped as JSON may escape it.
    text = "\u00e9" * (DATASET_TEXT_WIRE_BYTES // 6)
    body = json.dumps({"spec": spec(groupSize=1), "datasetText": text}).encode()
    assert len(body) > limit
    r = api.put("/v1/experiments/body/x", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "groupSize" in r.json()["detail"], r.text[:300]
    assert probe(server).status_code == 200


def test_a_file_the_client_names_that_cannot_be_read_is_its_error(api: httpx.Client) -> None:
    # Write-only even for root: reading it fails with PermissionError after the is-a-file check.
    unreadable = Path("/proc/sys/vm/compact_memory")
    if not unreadable.is_file():
        pytest.skip("no /proc/sys/vm/compact_memory on this machine")
    gsm8k = {**spec(), "task": {"name": "gsm8k", "dataset": {"path": str(unreadable)}}}
    r = api.put("/v1/experiments/files/x", json={"spec": gsm8k})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("spec.task.dataset.path:")
    assert api.get("/v1/experiments/files/x").status_code == 404


def test_probes_and_unknown_deletes_never_wait_on_the_engine(
    server: RuntimeServer, api: httpx.Client
) -> None:
    ns, name = "held", "x"
    # A checkpoint of its own, whose adapter_config.json is then made a FIFO: a re-admission from it
    # holds the engine's bookkeeping lock while it waits to read, as a slow disk would.
    assert api.put(f"/v1/experiments/{ns}/{name}", json={"spec": spec()}).status_code == 200
    wait_for(lambda: api.get(f"/v1/experiments/{ns}/{name}").json()["step"] >= 1, what="one step")
    removed = api.delete(f"/v1/experiments/{ns}/{name}")
    while removed.status_code == 202:
        removed = api.delete(f"/v1/experiments/{ns}/{name}")
    checkpoint = Path(removed.json()["checkpoint"]["path"])
    config = checkpoint / "adapter_config.json"
    content = config.read_bytes()
    config.unlink()
    os.mkfifo(config)

    answers: dict[str, httpx.Response] = {}

    def readmit() -> None:
        with server.client(timeout=300) as client:
            body = {"spec": spec(), "resumeFrom": str(checkpoint)}
            answers["put"] = client.put(f"/v1/experiments/{ns}/{name}", json=body)

    putter = threading.Thread(target=readmit, daemon=True)
    putter.start()
    writer: int | None = None
    try:

        def reader_waits() -> int | None:
            with contextlib.suppress(OSError):  # ENXIO until the server opens it for reading
                return os.open(config, os.O_WRONLY | os.O_NONBLOCK)
            return None

        writer = wait_for(reader_waits, what="the PUT to wait on the FIFO")
        with ThreadPoolExecutor(120) as pool:
            # More DELETEs of unknown experiments than FastAPI's thread pool has threads: each is
            # answered at once, none waits for the engine's lock.
            deletes = [pool.submit(api.delete, f"/v1/experiments/nobody/n{i}") for i in range(60)]
            assert probe(server).status_code in (200, 503)
            for f in deletes:
                r = f.result(timeout=PROBE_TIMEOUT_S * 3)
                assert r.status_code == 404 and "nobody/n" in r.json()["detail"]
            # Calls that must wait on the engine, more than the pool's threads: the probes still answer.
            lists = [pool.submit(api.get, "/v1/experiments") for _ in range(60)]
            health = probe(server)
            assert health.status_code in (200, 503), health.text
            assert probe(server, "/readyz").status_code in (200, 503)

            # The tick thread waits too: once past the deadline the probes say the loop is stalled.
            stalled = wait_for(
                lambda: (h := probe(server)).status_code == 503 and h, what="/healthz to answer 503"
            )
            assert stalled.json()["status"] == "stalled"
            assert "tick deadline" in stalled.json()["detail"]
            assert probe(server, "/readyz").status_code == 503

            os.write(writer, content)
            os.close(writer)
            writer = None
            putter.join(120)
            assert answers["put"].status_code == 200, answers["put"].text
            assert all(f.result().status_code == 200 for f in lists)
        wait_for(lambda: probe(server).status_code == 200, what="/healthz to answer 200 again")
        assert probe(server, "/readyz").status_code == 200
    finally:
        if writer is not None:
            os.write(writer, content)
            os.close(writer)
        putter.join(120)
    r = api.delete(f"/v1/experiments/{ns}/{name}")
    while r.status_code == 202:
        r = api.delete(f"/v1/experiments/{ns}/{name}")
    assert r.status_code == 200


def test_a_token_no_header_can_carry_is_refused_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    env[TOKEN_ENV] = "s\u00e9same-ouvre-toi"
    cmd = [sys.executable, "-m", "clora.cli", "runtime", "--model", "tiny", "--checkpoint-dir", str(tmp_path)]
    cmd += ["--port", str(free_port())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert TOKEN_ENV in done.stderr and "ASCII" in done.stderr


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(address)
    return found


def test_without_auth_it_listens_on_loopback_only(tmp_path: Path) -> None:
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    cmd = [sys.executable, "-m", "clora.cli", "runtime", "--model", "tiny", "--device", "cpu"]
    cmd += ["--checkpoint-dir", str(tmp_path), "--port", str(port), "--insecure-no-auth"]
    log = (tmp_path / "runtime.log").open("wb")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        addresses = wait_for(lambda: _listening(port), what=f"a listener on port {port}")
        assert addresses == ["0100007F"], addresses  # 127.0.0.1, not 0.0.0.0 (00000000)
    finally:
        process.kill()
        process.wait()
        log.close()
