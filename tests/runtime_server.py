"""Starts a real `clora runtime` process on a free localhost port and waits until it is ready.

Used by the server tests and by the operator tests (which give each emulated pod its own loopback
address, e.g. host="127.0.0.3", and the same port). Importable on its own: no pytest fixtures here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clora.constants import TOKEN_ENV, TOKEN_FILE_ENV

READY_TIMEOUT_S = 300.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RuntimeServer:
    """A running `clora runtime` process."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    token: str | None
    checkpoint_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """An httpx client on the server's URL with the bearer token set."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL if it does not come within `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_runtime_server(
    checkpoint_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    model: str = "tiny",
    token: str | None = "auto",
    token_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    python: str = sys.executable,
    ready_timeout: float = READY_TIMEOUT_S,
    wait_ready: bool = True,
    dataset_roots: Sequence[Path] | None = None,
    max_open_files: int | None = None,
) -> RuntimeServer:
    """Start `clora runtime` (this interpreter's `python -m clora.cli runtime`) and wait for /readyz.

    token="auto" makes a random one; None starts it with --insecure-no-auth. With `token_file`, the
    token is written there and passed as CLORA_RUNTIME_TOKEN_FILE (as a mounted Secret would be)
    instead of CLORA_RUNTIME_TOKEN. `env` is added to this
    process's environment (e.g. CLORA_CACHE_DIR). `dataset_roots`: the runtime's --dataset-roots;
    None: the folder checkpoint_dir is in (a test's tmp folder, where its datasets are written).
    `max_open_files` lowers the process's soft RLIMIT_NOFILE (as a pod's may be). Raises RuntimeError
    with the log's tail if the process exits or is not ready in time.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    token = secrets.token_urlsafe(24) if token == "auto" else token
    log_path = log_path or checkpoint_dir / f"runtime-{host}-{port}.log"
    args = [
        python,
        "-m",
        "clora.cli",
        "runtime",
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--device",
        "cpu",
        "--dataset-roots",
        os.pathsep.join(
            str(r) for r in (dataset_roots if dataset_roots is not None else [checkpoint_dir.parent])
        ),
        *extra_args,
    ]
    if token is None:
        args.append("--insecure-no-auth")
    child_env = {**os.environ, **(env or {})}
    child_env.pop(TOKEN_ENV, None)
    child_env.pop(TOKEN_FILE_ENV, None)
    if token is not None and token_file is not None:
        Path(token_file).write_text(token + "\n")
        child_env[TOKEN_FILE_ENV] = str(token_file)
    elif token is not None:
        child_env[TOKEN_ENV] = token
    # Two cores shared by everything: one torch thread per server unless the caller says otherwise.
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    with log_path.open("ab") as log:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = None if max_open_files is None else (max_open_files, hard)
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            preexec_fn=None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
        )
    server = RuntimeServer(process, host, port, token, checkpoint_dir, log_path, args)
    if wait_ready:
        try:
            wait_until_ready(server, ready_timeout)
        except BaseException:
            server.kill()
            raise
    return server


def wait_until_ready(server: RuntimeServer, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"clora runtime exited with {server.process.returncode}:\n{server.log()[-4000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"clora runtime not ready after {timeout:.0f} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def running_runtime_server(checkpoint_dir: Path, **kwargs: Any) -> Iterator[RuntimeServer]:
    """start_runtime_server(...) as a context manager that stops the process on exit."""
    server = start_runtime_server(checkpoint_dir, **kwargs)
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.terminate(timeout=60)
        server.kill()


def wait_for(predicate: Any, timeout: float = 180.0, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll `predicate()` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
