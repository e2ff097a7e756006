"""examples/continual as its README runs it: the example verifier as a process of its own, `clora run`
on the folder (tiny model), and push.py feeding a continual copy of the experiment on a runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from runtime_server import free_port, running_runtime_server, wait_for

from clora.cli import main as clora

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "continual"


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Path]:
    """A copy of the example folder whose verifier (running) listens on a free port."""
    port = free_port()
    folder = tmp_path / "continual"
    shutil.copytree(EXAMPLE, folder)
    experiment = folder / "experiment.yaml"
    text = experiment.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    # Publishing to vLLM is tested against a real server in tests/test_vllm_sampler.py; here, none.
    text = text.split("  publish:")[0]
    experiment.write_text(text.replace("examples/continual/prompts.jsonl", str(folder / "prompts.jsonl")))
    env = {**os.environ, "PORT": str(port), "VERIFIER_TOKEN": "change-me"}
    verifier = subprocess.Popen([sys.executable, str(folder / "verifier.py")], env=env)

    def answers() -> bool:
        try:
            return httpx.post(f"http://127.0.0.1:{port}/score", json={"items": []}).status_code == 401
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=30, what="the example verifier")
        yield folder
    finally:
        verifier.kill()
        verifier.wait()


def test_clora_run_trains_the_example_with_its_verifier(example: Path, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    args = ["run", "-f", str(example), "--model", "tiny", "--steps", "2", "--device", "cpu", "--threads", "1"]
    assert clora([*args, "--output", str(tmp_path / "out"), "--json", str(summary)]) == 0
    (entry,) = json.loads(summary.read_text())["experiments"]
    assert entry["name"] == "judged-sums" and entry["phase"] == "Succeeded", entry
    assert len(entry["rewardPerStep"]) == 2


def test_push_feeds_a_continual_copy_on_a_runtime(example: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((example / "experiment.yaml").read_text())["spec"]
    del spec["training"]["steps"]  # continual: prompts only from push.py
    del spec["task"]["dataset"]
    with running_runtime_server(tmp_path / "runs") as server, server.client() as api:
        r = api.put("/v1/experiments/default/judged-sums", json={"spec": spec, "verifierToken": "change-me"})
        assert r.status_code == 200, r.text
        env = {**os.environ, "CLORA_RUNTIME_TOKEN": server.token or ""}
        push = [sys.executable, str(example / "push.py"), server.url, "default", "judged-sums"]
        pushed = subprocess.run(
            [*push, str(example / "prompts.jsonl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "accepted 24, queued" in pushed.stdout
        state = wait_for(
            lambda: (s := api.get("/v1/experiments/default/judged-sums").json())["step"] >= 2 and s,
            what="steps on pushed prompts",
        )
        assert state["phase"] == "Running" and state["reward"]["mean"] is not None
