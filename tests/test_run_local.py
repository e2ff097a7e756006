"""`clora run` on a small folder with the tiny model: adapters, summary JSON and reward plot written."""

from __future__ import annotations

import json
from pathlib import Path

from clora.cli import main as clora

RUNTIME = """apiVersion: clora.dev/v1alpha1
kind: LoRARuntime
metadata: {name: local}
spec:
  baseModel: smollm2
  capacity: {maxAdapters: 2, maxRank: 8}
"""
EXPERIMENT = """apiVersion: clora.dev/v1alpha1
kind: LoRAExperiment
metadata: {name: NAME}
spec:
  runtime: local
  task: {name: arithmetic, difficulty: DIFFICULTY}
  lora: {rank: RANK}
  training: {steps: 5, learningRate: 1.0e-3, promptsPerStep: 2, groupSize: 2, maxNewTokens: 4}
  checkpoint: {everySteps: 2, keep: 1}
"""


def write_folder(folder: Path, experiments: list[tuple[str, int, int]]) -> None:
    folder.mkdir()
    (folder / "runtime.yaml").write_text(RUNTIME)
    docs = [
        EXPERIMENT.replace("NAME", n).replace("DIFFICULTY", str(d)).replace("RANK", str(r))
        for n, d, r in experiments
    ]
    (folder / "experiments.yaml").write_text("---\n".join(docs))


def test_clora_run_trains_every_experiment_and_writes_results(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    # three experiments on two slots: the third waits for a free slot
    write_folder(folder, [("one", 1, 4), ("two", 2, 8), ("three", 3, 2)])
    out = tmp_path / "out"
    summary_file = tmp_path / "summary.json"
    args = ["-f", str(folder), "--model", "tiny", "--steps", "3", "--device", "cpu", "--threads", "1"]
    rollouts_file = tmp_path / "rollouts.jsonl"
    code = clora(
        ["run", *args, "--output", str(out), "--json", str(summary_file), "--rollouts", str(rollouts_file)]
    )
    assert code == 0
    summary = json.loads(summary_file.read_text())
    assert summary["model"] == "tiny" and summary["tokensSampled"] > 0
    by_name = {e["name"]: e for e in summary["experiments"]}
    assert set(by_name) == {"one", "two", "three"}
    for name, entry in by_name.items():
        assert entry["phase"] == "Succeeded" and entry["finalStep"] == entry["totalSteps"] == 3
        assert len(entry["rewardPerStep"]) == 3 and entry["wallSeconds"] > 0
        adapter = out / "default" / name
        assert entry["adapter"] == str(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "default" / "two" / "adapter_config.json").read_text())["r"] == 8
    for entry in by_name.values():  # the last step's RL statistics, named as TRL logs them
        assert entry["stats"]["completionLength"] > 0 and entry["stats"]["loss"] is not None
    # --rollouts: one JSON object per completion, every step of every experiment
    lines = [json.loads(line) for line in rollouts_file.read_text().splitlines()]
    fields = {"namespace", "name", "step", "prompt", "completion", "reward", "advantage"}
    assert all(fields | {"samplerLogprob", "trainerLogprob", "tokens"} <= set(line) for line in lines)
    assert {(line["name"], line["step"]) for line in lines} == {(n, s) for n in by_name for s in range(3)}
    for line in lines:  # the sampler's and the trainer's log-probs of the same weights agree
        assert abs(line["samplerLogprob"] - line["trainerLogprob"]) < 1e-4
    png = (out / "rewards.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_clora_run_refuses_a_bad_folder(tmp_path: Path, capsys: object) -> None:
    folder = tmp_path / "bad"
    write_folder(folder, [("one", 1, 4)])
    (folder / "experiments.yaml").write_text(
        (folder / "experiments.yaml").read_text().replace("rank: 4", "rank: 0")
    )
    assert clora(["run", "-f", str(folder), "--model", "tiny", "--output", str(tmp_path / "o")]) == 1
    assert "lora.rank" in capsys.readouterr().err  # type: ignore[attr-defined]
