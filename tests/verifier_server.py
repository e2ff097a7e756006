"""A real HTTP verifier for the tests (task http), stdlib only: `python verifier_server.py PORT TOKEN`.

Paths: /score answers a reward per item (varied, so adapters learn; see reward()); /slow waits 5 s
first; /short answers one reward too few; /nan answers a NaN; /flaky answers 503 twice, then scores.
Every path wants `Authorization: Bearer TOKEN` (401 otherwise). GET /seen tells how many POSTs each
path got and the experiments and item counts of the last one.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from runtime_server import free_port, wait_for


def reward(completion: str) -> float:
    return (sum(map(ord, completion)) % 5) / 4


SEEN: dict[str, Any] = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        with LOCK:
            self._answer(200, SEEN)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with LOCK:
            seen = SEEN.setdefault(self.path, {"posts": 0})
            seen["posts"] += 1
            seen["last"] = {"experiment": body["experiment"], "items": len(body["items"])}
            count = seen["posts"]
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._answer(401, {"detail": "wrong token"})
        rewards = [reward(item["completion"]) for item in body["items"]]
        if self.path == "/slow":
            time.sleep(5)
        elif self.path == "/short":
            rewards = rewards[:-1]
        elif self.path == "/nan":
            rewards[0] = float("nan")
        elif self.path == "/flaky" and count <= 2:
            return self._answer(503, {"detail": "warming up"})
        self._answer(200, {"rewards": rewards})

    def log_message(self, *args: Any) -> None:  # quiet
        pass


def seen(url: str) -> dict[str, Any]:
    """What the verifier at `url` was sent (GET /seen)."""
    return dict(httpx.get(f"{url}/seen").json())


@contextlib.contextmanager
def running_verifier() -> Iterator[tuple[str, str]]:
    """(base URL, token) of this script running as a process of its own."""
    port, token = free_port(), secrets.token_urlsafe(16)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(port), token])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=30, what="the verifier")
        yield url, token
    finally:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/seen").status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    TOKEN = sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
