"""Starting benchmark processes and timing them from the outside, the way a job scheduler would see them."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

R = TypeVar("R", bound=BaseModel)


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a `clora runtime` process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_module(
    module: str, request: BaseModel, result_type: type[R], timeout: float | None = None
) -> tuple[R, float]:
    """Run `python -m module REQUEST RESULT` in a fresh process; (its result, its wall seconds).

    The request gets `spawned_at` (if it has that field) set just before the spawn, so the worker can
    tell its cold start (interpreter, imports, model load) apart from its training.
    """
    with tempfile.TemporaryDirectory(prefix="clora-bench-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        start = time.time()
        if "spawned_at" in type(request).model_fields:
            request = request.model_copy(update={"spawned_at": start})
        req.write_text(request.model_dump_json())
        proc = subprocess.run(
            [sys.executable, "-m", module, str(req), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.time() - start
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{module} exited {proc.returncode}:\n{tail}")
        return result_type.model_validate_json(out.read_text()), wall
