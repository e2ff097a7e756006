"""`clora bench replicas`: what a pod of several replicas (Ray actors) costs and how it recovers.

Real `clora runtime` processes, as a pod runs them, measured from the outside:
- start-up: spawn to /readyz 200 for 1 replica (in-process) and for 2 (Ray), and ray.init's share;
- memory: proportional set size (PSS, so shared libraries count once) of every process of the pod,
  split into the replicas' engines and the rest (the pod's own process, Ray's daemons);
- throughput: the same N experiments on 1 replica and on 2, steps per second over equal windows
  after a warm-up (mean ± standard error over the windows). On a CPU the replicas share the cores, so
  2 cannot beat 1: the ratio is the overhead of running them as separate processes;
- recovery: kill -9 of one replica's process to /readyz 200 again (its experiments re-admitted from
  their newest checkpoints) and to their first step after it, repeated.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from clora_runtime.bench.processes import free_port
from clora_runtime.bench.throughput import machine


class _Pod:
    """One `clora runtime` process (and, with replicas, its Ray instance)."""

    def __init__(self, model: str, replicas: int, threads: int, device: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"runtime-{replicas}.log"
        args = [sys.executable, "-m", "clora.cli", "runtime", "--insecure-no-auth", "--port", str(self.port)]
        args += ["--host", "127.0.0.1", "--model", model, "--device", device, "--threads", str(threads)]
        args += ["--checkpoint-dir", str(workdir / f"checkpoints-{replicas}"), "--max-adapters", "16"]
        if replicas > 1:
            # A device id per replica, as on a GPU node (on a CPU they stay on the cores).
            args += ["--replicas", str(replicas), "--ray-gpus", str(replicas)]
        self.spawned = time.monotonic()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return self.http.get("/readyz").status_code == 200
        return False

    def wait(self, what: str, check: Any, timeout: float = 600, interval: float = 0.1) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"clora runtime exited:\n{self.log.read_text()[-3000:]}")
            if check():
                return time.monotonic()
            time.sleep(interval)
        raise TimeoutError(f"{what} not within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def experiments(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.http.get("/v1/experiments").json()["experiments"]}

    def steps(self) -> int:
        return sum(e["step"] for e in self.experiments().values())

    def replica_pid(self, replica: int) -> int:
        return int(re.findall(rf"replica {replica} of \d+ running in pid (\d+)", self.log.read_text())[-1])

    def memory(self) -> dict[str, float]:
        """MB of proportional set size: the replicas' engines, and everything else of the pod."""
        import psutil

        root = psutil.Process(self.process.pid)
        engines = other = 0.0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                pss = p.memory_full_info().pss / 2**20
                if "ReplicaWorker" in " ".join(p.cmdline()) or p.name().startswith("ray::Replica"):
                    engines += pss
                else:
                    other += pss
        return {"engines": engines, "rest": other, "total": engines + other}

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()


@contextlib.contextmanager
def _pod(*args: Any) -> Iterator[_Pod]:
    pod = _Pod(*args)
    try:
        yield pod
    finally:
        pod.close()


def _spec(seed: int) -> dict[str, Any]:
    return {
        "runtime": "bench",
        "task": {"name": "arithmetic", "difficulty": 1},
        "lora": {"rank": 8, "alpha": 16},
        "training": {"steps": 10**6, "promptsPerStep": 2, "groupSize": 4, "maxNewTokens": 8, "seed": seed},
        "checkpoint": {"everySteps": 5, "keep": 2},
    }


def _mean_se(xs: list[float]) -> tuple[float, float]:
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
    return statistics.fmean(xs), se


def _arm(
    model: str, replicas: int, experiments: int, threads: int, device: str, windows: int, window_s: float,
    kills: int, workdir: Path, console: Console,
) -> dict[str, Any]:  # fmt: skip
    with _pod(model, replicas, threads, device, workdir) as pod:
        ready_at = pod.wait("/readyz", pod.ready)
        started = re.search(r"Ray started in ([\d.]+) s", pod.log.read_text())
        for i in range(experiments):
            r = pod.http.put(f"/v1/experiments/bench/e{i}", json={"spec": _spec(i)})
            r.raise_for_status()
        pod.wait("warm-up", lambda: all(e["step"] >= 3 for e in pod.experiments().values()), interval=0.5)
        rates = []
        for w in range(windows):
            console.log(f"{replicas} replica(s): window {w + 1} of {windows}")
            first, t0 = pod.steps(), time.monotonic()
            time.sleep(window_s)
            rates.append((pod.steps() - first) / (time.monotonic() - t0))
        mean, se = _mean_se(rates)
        arm: dict[str, Any] = {
            "replicas": replicas,
            "readySeconds": ready_at - pod.spawned,
            "rayInitSeconds": float(started.group(1)) if started else None,
            "memoryMB": pod.memory(),
            "stepsPerSecond": mean,
            "stepsPerSecondSe": se,
            "windowRates": rates,
        }
        if replicas > 1 and kills:
            arm["recovery"] = _recoveries(pod, kills, console)
        return arm


def _recoveries(pod: _Pod, kills: int, console: Console) -> dict[str, Any]:
    back, stepped = [], []
    for k in range(kills):
        console.log(f"kill -9 of replica 1 ({k + 1} of {kills})")
        on_1 = [n for n, e in pod.experiments().items() if e["replica"] == 1]
        os.kill(pod.replica_pid(1), signal.SIGKILL)
        killed = time.monotonic()
        pod.wait("/readyz 503", lambda: not pod.ready(), timeout=60, interval=0.02)
        ready = pod.wait("/readyz 200", pod.ready, interval=0.05)
        at_ready = {n: pod.experiments()[n]["step"] for n in on_1}
        first = pod.wait(
            "a step after resuming",
            lambda at_ready=at_ready: all(pod.experiments()[n]["step"] > s for n, s in at_ready.items()),
            interval=0.05,
        )
        back.append(ready - killed)
        stepped.append(first - killed)
        time.sleep(2)
    b, bse = _mean_se(back)
    s, sse = _mean_se(stepped)
    return {
        "kills": kills,
        "killToReadySeconds": b,
        "killToReadySecondsSe": bse,
        "killToSteppingSeconds": s,
        "killToSteppingSecondsSe": sse,
        "killToReady": back,
        "killToStepping": stepped,
    }


def replicas_bench(
    model: str = "tiny",
    experiments: int = 8,
    threads: int = 2,
    device: str = "cpu",
    windows: int = 5,
    window_s: float = 20.0,
    kills: int = 3,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="clora-bench-replicas-") as tmp:
        arms = {
            f"{r} replica{'s' if r > 1 else ''}": _arm(
                model, r, experiments, threads, device, windows, window_s, kills, Path(tmp), console
            )
            for r in (1, 2)
        }
    one, two = arms["1 replica"], arms["2 replicas"]
    ratio = two["stepsPerSecond"] / one["stepsPerSecond"]
    ratio_se = (
        ratio
        * (
            (two["stepsPerSecondSe"] / two["stepsPerSecond"]) ** 2
            + (one["stepsPerSecondSe"] / one["stepsPerSecond"]) ** 2
        )
        ** 0.5
    )
    return {
        "config": {
            "model": model,
            "experiments": experiments,
            "threadsPerReplica": threads,
            "device": device,
            "windows": windows,
            "windowSeconds": window_s,
        },
        "arms": arms,
        "twoOverOne": ratio,
        "twoOverOneSe": ratio_se,
        "rayStartupSeconds": two["rayInitSeconds"],
        "extraReadySeconds": two["readySeconds"] - one["readySeconds"],
        # What a 2-replica pod holds beyond two 1-replica pods: the pod's own process and Ray's daemons.
        "podMemoryOverheadMB": two["memoryMB"]["total"] - 2 * one["memoryMB"]["total"],
        "machine": machine(),
    }


def table(r: dict[str, Any]) -> Any:
    from rich.table import Table

    c = r["config"]
    t = Table(
        title=f"{c['experiments']} experiments on {c['model']}, {c['threadsPerReplica']} threads per replica"
    )
    for col in ("arm", "ready s", "ray.init s", "steps/s", "PSS engines MB", "PSS rest MB"):
        t.add_column(col, justify="right")
    for name, a in r["arms"].items():
        m = a["memoryMB"]
        t.add_row(
            name,
            f"{a['readySeconds']:.1f}",
            "-" if a["rayInitSeconds"] is None else f"{a['rayInitSeconds']:.1f}",
            f"{a['stepsPerSecond']:.2f} ± {a['stepsPerSecondSe']:.2f}",
            f"{m['engines']:.0f}",
            f"{m['rest']:.0f}",
        )
    return t


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = r["arms"]
    names = list(arms)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(
        names,
        [a["stepsPerSecond"] for a in arms.values()],
        yerr=[a["stepsPerSecondSe"] for a in arms.values()],
    )
    ax1.set_ylabel("experiment steps / s")
    ax1.set_title(f"throughput, {r['config']['experiments']} experiments")
    engines = [a["memoryMB"]["engines"] for a in arms.values()]
    rest = [a["memoryMB"]["rest"] for a in arms.values()]
    ax2.bar(names, engines, label="replica engines")
    ax2.bar(names, rest, bottom=engines, label="pod process (1 replica: with its engine) + Ray")
    ax2.set_ylabel("PSS MB")
    ax2.set_title("memory of the pod")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
