"""Trained adapters sent to serving while training goes on (LoRAExperiment spec.publish).

The engine offers every checkpoint it writes. A thread of its own takes the ones due, copies each to
<experiment folder>/published/step-N-<run> (checkpoint pruning never touches that folder, so the server can
always read the version it serves) and asks the server to load it: vLLM's
POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace": true}, which replaces the version
served under that name; for an aibrix target the copy is all, and the operator points the experiment's
ModelAdapter at it. Nothing here runs on the tick thread or under an engine lock: a slow or down
server delays only the publish. A newer offer replaces one not sent yet; a failed attempt is retried
(after 1 s, 2 s, 4 s), then given up until the next checkpoint, with the error in the experiment's
state (publishError). Training never waits for it, except that the final step's publish is awaited
before the experiment reports Succeeded (settled(): done or given up).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from clora.api.experiment_types import CheckpointRef, PublishedRef, PublishPolicy
from clora_runtime import checkpoint
from clora_runtime.tasks.verifier import shown

log = logging.getLogger(__name__)

ATTEMPTS = 4
BACKOFF_S = 1.0
KEPT_COPIES = 2  # the version served and the one before it
TIMEOUT_S = 60.0  # loading an adapter reads its files: allow for a slow volume


@dataclass(frozen=True)
class _Job:
    namespace: str
    name: str
    policy: PublishPolicy
    checkpoint: CheckpointRef


def adapter_name(namespace: str, name: str, policy: PublishPolicy) -> str:
    """The name the version is served under: the target's, else <namespace>-<name> on vLLM (names
    there are global) or the experiment's name for an aibrix ModelAdapter (namespaced)."""
    if policy.vllm is not None:
        return policy.vllm.adapter_name or f"{namespace}-{name}"
    assert policy.aibrix is not None
    return policy.aibrix.adapter_name or name


def target_of(policy: PublishPolicy) -> str:
    return shown(policy.vllm.url) if policy.vllm is not None else "aibrix"


class Publisher:
    def __init__(
        self, client: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._http = client or httpx.Client()
        self._sleep = sleep
        self._cond = threading.Condition()
        self._pending: dict[str, _Job] = {}
        self._busy: set[str] = set()
        self._published: dict[str, PublishedRef] = {}
        self._errors: dict[str, str] = {}
        self._offered: dict[str, int] = {}  # key -> the newest checkpoint step taken (sent or given up)
        self._thread: threading.Thread | None = None

    def offer(
        self, namespace: str, name: str, policy: PublishPolicy | None, checkpoint: CheckpointRef, final: bool
    ) -> None:
        """A checkpoint was written: publish it if the policy says it is due (never blocks)."""
        if policy is None:
            return
        key = f"{namespace}/{name}"
        with self._cond:
            if self._offered.get(key, -1) >= checkpoint.step:
                return  # taken already: published, being published, or given up
            last = self._published.get(key)
            every = policy.every_steps
            if not (final or every is None or checkpoint.step - (last.step if last else 0) >= every):
                return
            self._pending[key] = _Job(namespace, name, policy, checkpoint)
            self._offered[key] = checkpoint.step
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="clora-publisher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def settled(self, key: str) -> bool:
        """Nothing waits to be published for this experiment, and nothing is being published."""
        with self._cond:
            return key not in self._pending and key not in self._busy

    def status(self, key: str) -> tuple[PublishedRef | None, str]:
        """(the version serving, the last publish error or "")."""
        with self._cond:
            return self._published.get(key), self._errors.get(key, "")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                key, job = next(iter(self._pending.items()))
                del self._pending[key]
                self._busy.add(key)
            try:
                self._attempts(key, job)
            finally:
                with self._cond:
                    self._busy.discard(key)
                    self._cond.notify_all()

    def _attempts(self, key: str, job: _Job) -> None:
        error = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                self._sleep(BACKOFF_S * 2 ** (attempt - 1))
                with self._cond:
                    if key in self._pending:
                        return  # a newer checkpoint is due: it replaces this one
            try:
                published = self._publish(job)
            except Exception as e:  # any failure: said in the state, retried, never raised to training
                error = f"publishing step {job.checkpoint.step} to {target_of(job.policy)} failed: {e}"
                log.warning("%s: %s (attempt %d of %d)", key, error, attempt + 1, ATTEMPTS)
                continue
            with self._cond:
                self._published[key] = published
                self._errors.pop(key, None)
            log.info("%s: step %d published as %s", key, published.step, published.name)
            return
        with self._cond:
            self._errors[key] = error

    def _publish(self, job: _Job) -> PublishedRef:
        source = Path(job.checkpoint.path)
        folder = source.parent / "published"
        copy = folder / source.name
        if not copy.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=folder))
            shutil.copytree(source, staging, dirs_exist_ok=True)
            staging.replace(copy)  # whole or absent, as checkpoints are
        name = adapter_name(job.namespace, job.name, job.policy)
        if job.policy.vllm is not None:
            url = job.policy.vllm.url.rstrip("/")
            body = {"lora_name": name, "lora_path": str(copy), "load_inplace": True}
            rsp = self._http.post(f"{url}/v1/load_lora_adapter", json=body, timeout=TIMEOUT_S)
            if rsp.status_code >= 400:
                raise RuntimeError(f"HTTP {rsp.status_code}: {rsp.text[:300]}")
        # aibrix: the copy is the version; the operator points the ModelAdapter at it (status.published).
        # Only this run's copies: a phantom registration under the same name never prunes the real run's.
        run = checkpoint.run_of(source)
        for old in checkpoint.list_checkpoints(folder, run)[:-KEPT_COPIES]:
            shutil.rmtree(old, ignore_errors=True)
        return PublishedRef(
            step=job.checkpoint.step,
            name=name,
            target=target_of(job.policy),
            path=str(copy),
            time=datetime.now(UTC),
        )
