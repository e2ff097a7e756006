"""The engine's tick loop, on a thread of its own beside the HTTP server.

The thread first loads the base model (slow), then calls `engine.tick()` until told to stop. Routes
never wait for it: they call the engine's thread-safe methods and `wake()` the loop so a new or
resumed experiment starts at once instead of after an idle pause.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Tickable(Protocol):
    """What the loop needs of the engine."""

    def load(self) -> None: ...
    def tick(self) -> object | None: ...


def stall_message(tick_running_s: float | None, deadline_s: float | None) -> str | None:
    """The probes' detail for a tick running past its deadline (--tick-deadline), or None."""
    if tick_running_s is None or deadline_s is None or tick_running_s <= deadline_s:
        return None
    return (
        f"stalled: the running tick has taken {tick_running_s:.0f} s,"
        f" above the tick deadline of {deadline_s:g} s (--tick-deadline)"
    )


class LoopState(enum.StrEnum):
    LOADING = "loading"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEAD = "dead"


class TickLoop:
    """Runs `engine.load()` and then `engine.tick()` in a loop on a daemon thread.

    An exception that escapes `tick()` is a fault of the engine, not of one experiment (those turn
    Failed inside the engine): the loop retries a few times, in case it was passing, then dies and
    /readyz and /healthz say so, so that Kubernetes restarts the pod. A tick that runs longer than
    `tick_deadline_s` (a hung sampler, a lock never released) makes `stalled` say so, and the probes too.
    """

    def __init__(
        self,
        engine: Tickable,
        *,
        after_tick: Callable[[], None] | None = None,
        idle_wait_s: float = 0.25,
        max_consecutive_failures: int = 3,
        tick_deadline_s: float | None = None,
    ) -> None:
        self._engine = engine
        self._after_tick = after_tick
        self._idle_wait_s = idle_wait_s
        self._max_failures = max_consecutive_failures
        self._tick_deadline_s = tick_deadline_s
        self._tick_started: float | None = None  # time.monotonic() while a tick runs
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clora-tick-loop", daemon=True)
        self.state = LoopState.LOADING
        self.error: str | None = None
        self.ticks = 0
        self.loaded = False
        """The base model is in memory (the loop may have stopped or died since)."""

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Ends an idle wait now: called after a change that may give the engine work."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Asks for no further ticks and waits for the current one to end; False on timeout."""
        if self.state in (LoopState.LOADING, LoopState.RUNNING):
            self.state = LoopState.STOPPING
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def tick_running_s(self) -> float | None:
        """How long the running tick has run; None between ticks."""
        started = self._tick_started
        return None if started is None else time.monotonic() - started

    @property
    def stalled(self) -> str | None:
        """Why the loop is stalled (its running tick is past the deadline), or None."""
        running = self.tick_running_s()
        return stall_message(running, self._tick_deadline_s)

    @property
    def ready(self) -> bool:
        return self.state == LoopState.RUNNING and self.stalled is None

    def _run(self) -> None:
        try:
            started = time.perf_counter()
            self._engine.load()
            self.loaded = True
            log.info("base model loaded in %.1f s", time.perf_counter() - started)
        except BaseException as e:
            log.exception("loading the base model failed")
            self.error = f"loading the base model failed: {type(e).__name__}: {e}"
            self.state = LoopState.DEAD
            return
        if self._stop.is_set():
            self.state = LoopState.STOPPED
            return
        self.state = LoopState.RUNNING
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            self._tick_started = time.monotonic()
            try:
                report = self._engine.tick()
                failures = 0
            except Exception as e:
                failures += 1
                log.exception("tick failed (%d in a row)", failures)
                if failures >= self._max_failures:
                    self.error = f"the tick loop died: {type(e).__name__}: {e}"
                    self.state = LoopState.DEAD
                    return
                report = None
            finally:
                self._tick_started = None
            self.ticks += 1
            if self._after_tick is not None:
                try:
                    self._after_tick()
                except Exception:
                    log.exception("after-tick hook failed")
            if report is None:
                # Idle (or a failed tick): wait for work instead of spinning.
                self._wake.wait(self._idle_wait_s)
        self.state = LoopState.STOPPED
