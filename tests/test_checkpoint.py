"""Checkpoints (issue 3, item 6): 2k steps in one process end where k steps, a checkpoint, a new process
and k more steps end; checkpoints are whole or absent and only `keep` remain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

K = 3
# One script, three processes: train to `steps` (optionally resuming), then export the adapter.
SCRIPT = """
import json, sys
from pathlib import Path
from clora.api import LoRAExperimentSpec
from clora_runtime.config import EngineConfig
from clora_runtime.engine import Engine
from clora_runtime.tasks import rewards

rewards.REWARDS["exact-match"] = lambda text, answer: (sum(map(ord, text)) % 5) / 4
steps, ckpt_dir, out, resume = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] or None
engine = Engine(EngineConfig(model="tiny", device="cpu", threads=1, checkpoint_dir=ckpt_dir))
engine.load()
spec = LoRAExperimentSpec.model_validate({
    "runtime": "local",
    "task": {"name": "arithmetic"},
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
    "training": {"steps": steps, "learningRate": 2e-3, "promptsPerStep": 2, "groupSize": 4,
                 "maxNewTokens": 6, "seed": 5, "klCoef": 0.05},
    "checkpoint": {"everySteps": K_STEPS, "keep": 1},
})
engine.upsert("ns", "x", spec, resume_from=resume)
while engine.tick() is not None:
    pass
state = engine.state("ns", "x")
engine.bank.export_peft("ns/x", out)
Path(out, "state.json").write_text(json.dumps({"step": state.step, "checkpoint": state.last_checkpoint.path}))
""".replace("K_STEPS", str(K))


def run(
    tmp_path: Path, steps: int, name: str, resume: str = "", ckpt: str = ""
) -> tuple[dict[str, torch.Tensor], dict]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    folder = tmp_path / f"ckpt-{ckpt or name}"
    subprocess.run(
        [sys.executable, str(script), str(steps), str(folder), str(out), resume],
        check=True,
        timeout=300,
    )
    return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "state.json").read_text())


def test_resume_in_a_new_process_continues_exactly(tmp_path: Path) -> None:
    straight, straight_state = run(tmp_path, 2 * K, "straight")
    _, half_state = run(tmp_path, K, "half")
    assert half_state["step"] == K
    # A new process on the same checkpoint folder (resumeFrom lies in the experiment's own folder).
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt-half" / "ns" / "x").iterdir())
    state = json.loads((tmp_path / "ckpt-half" / "ns" / "x" / checkpoints[0] / "state.json").read_text())
    resumed, resumed_state = run(tmp_path, 2 * K, "resumed", resume=half_state["checkpoint"], ckpt="half")
    assert straight_state["step"] == resumed_state["step"] == 2 * K

    weight_norm = torch.sqrt(sum(t.double().pow(2).sum() for t in straight.values()))
    diff_norm = torch.sqrt(sum((straight[k].double() - resumed[k].double()).pow(2).sum() for k in straight))
    learned = torch.sqrt(sum(t.double().pow(2).sum() for k, t in straight.items() if "lora_B" in k))
    assert learned > 0
    assert diff_norm <= 1e-6 * weight_norm

    assert checkpoints == [f"step-{K:08d}-{state['runId']}"]  # keep: 1, and no staging folder left behind
    assert state["step"] == K and len(state["rewards"]) == K
    # The resumed process continued the run it resumed from (and pruned its step K: keep 1).
    resumed_dir = Path(resumed_state["checkpoint"]).parent
    assert [p.name for p in resumed_dir.iterdir()] == [f"step-{2 * K:08d}-{state['runId']}"]


def test_resolve_resume_takes_a_newer_sibling_when_the_named_checkpoint_was_pruned(tmp_path: Path) -> None:
    from clora_runtime.checkpoint import resolve_resume

    run = tmp_path / "ns" / "exp"
    for name in ("step-00000030-aa", "step-00000040-aa", "step-00000050-bb", "step-00000045"):
        (run / name).mkdir(parents=True)
        (run / name / "adapter_model.safetensors").write_bytes(b"x")
    assert resolve_resume(str(run / "step-00000030-aa"), run) == run / "step-00000030-aa"
    # step 20 was pruned after the operator last saw it: the newest one of the same run is used,
    # never another run's (bb), nor one from before run ids.
    assert resolve_resume(str(run / "step-00000020-aa"), run) == run / "step-00000040-aa"
    assert resolve_resume(str(run / "step-00000020"), run) == run / "step-00000045"
    with pytest.raises(ValueError, match="resumeFrom"):
        resolve_resume(str(run / "step-00000060-aa"), run)  # nothing newer: refused
    with pytest.raises(ValueError, match="resumeFrom"):
        resolve_resume(str(run / "elsewhere"), run)
    with pytest.raises(ValueError, match=r"resumeFrom: .* not a checkpoint of this experiment"):
        resolve_resume(str(run / "step-00000030-aa"), tmp_path / "ns" / "other")
