"""`clora validate`: the examples pass; each bad manifest is refused once, naming its field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clora import cel
from clora.validation import (
    Manifest,
    Problem,
    check_object,
    validate_manifests,
    validate_paths,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

RUNTIME: dict[str, Any] = {
    "apiVersion": "clora.dev/v1alpha1",
    "kind": "LoRARuntime",
    "metadata": {"name": "qwen3-4b"},
    "spec": {"baseModel": "Qwen/Qwen3-4B-Instruct-2507", "capacity": {"maxAdapters": 8, "maxRank": 64}},
}
EXPERIMENT: dict[str, Any] = {
    "apiVersion": "clora.dev/v1alpha1",
    "kind": "LoRAExperiment",
    "metadata": {"name": "gsm8k-r16"},
    "spec": {
        "runtime": "qwen3-4b",
        "task": {"name": "gsm8k", "dataset": {"path": "/data/gsm8k/train.jsonl"}},
        "lora": {"rank": 16, "alpha": 32, "targetModules": ["all-linear"]},
        "training": {"steps": 20, "learningRate": 1.0e-5, "groupSize": 8, "promptsPerStep": 8},
        "checkpoint": {"everySteps": 10},
    },
}


def clora(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=REPO,
        timeout=120,
    )


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def edit(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with one field set (or removed, with value DELETE)."""
    obj = copy.deepcopy(base)
    *parents, last = dotted.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


DELETE = object()


def errors_of(*docs: dict[str, Any], old: tuple[dict[str, Any], ...] = ()) -> list[Problem]:
    manifests = [Manifest("in.yaml", i, d) for i, d in enumerate(docs, start=1)]
    old_manifests = [Manifest("old.yaml", i, d) for i, d in enumerate(old, start=1)]
    return validate_manifests(manifests, old_manifests).problems


# -- the examples ------------------------------------------------------------------------------------


def test_every_example_validates() -> None:
    files = sorted(EXAMPLES.rglob("*.y*ml"))
    assert any(f.parent.name == "gsm8k-sweep" for f in files)
    problems = validate_paths([EXAMPLES])
    assert problems == [], "\n".join(map(str, problems))


def test_gsm8k_sweep_is_one_runtime_and_eight_experiments() -> None:
    docs = []
    for f in sorted((EXAMPLES / "gsm8k-sweep").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    runtimes = [d for d in docs if d["kind"] == "LoRARuntime"]
    experiments = [d for d in docs if d["kind"] == "LoRAExperiment"]
    assert len(runtimes) == 1 and len(experiments) == 8
    (runtime,) = runtimes
    assert runtime["spec"]["baseModel"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert runtime["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert runtime["spec"]["capacity"]["maxAdapters"] == 8
    grid = {(e["spec"]["training"]["learningRate"], e["spec"]["lora"]["rank"]) for e in experiments}
    assert len(grid) == 8  # every point of the sweep differs
    for e in experiments:
        assert e["spec"]["runtime"] == runtime["metadata"]["name"]
        assert e["spec"]["task"] == {**e["spec"]["task"], "name": "gsm8k"}
        assert e["spec"]["task"]["dataset"]["path"] == "/data/gsm8k/train.jsonl"
        assert e["spec"]["training"]["steps"] == 20


def test_cli_accepts_the_examples() -> None:
    result = clora("validate", "-f", "examples/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


# -- one bad field at a time (Python API) ------------------------------------------------------------

# (case id, object, field path named, words in the message)
BAD_FIELDS: list[tuple[str, dict[str, Any], str, str]] = [
    ("rank 0", edit(EXPERIMENT, "spec.lora.rank", 0), "spec.lora.rank", "between 1 and 512"),
    ("rank 513", edit(EXPERIMENT, "spec.lora.rank", 513), "spec.lora.rank", "between 1 and 512"),
    ("rank a string", edit(EXPERIMENT, "spec.lora.rank", "16"), "spec.lora.rank", "type integer"),
    ("rank a float", edit(EXPERIMENT, "spec.lora.rank", 16.5), "spec.lora.rank", "type integer"),
    ("groupSize 1", edit(EXPERIMENT, "spec.training.groupSize", 1), "spec.training.groupSize", "at least 2"),
    ("promptsPerStep 0", edit(EXPERIMENT, "spec.training.promptsPerStep", 0), "spec.training.promptsPerStep",
     "at least 1"),
    ("temperature 0", edit(EXPERIMENT, "spec.training.temperature", 0), "spec.training.temperature",
     "greater than 0"),
    ("learningRate 0", edit(EXPERIMENT, "spec.training.learningRate", 0), "spec.training.learningRate",
     "greater than 0"),
    ("learningRate negative", edit(EXPERIMENT, "spec.training.learningRate", -1e-5),
     "spec.training.learningRate", "greater than 0"),
    ("learningRate a string", edit(EXPERIMENT, "spec.training.learningRate", "fast"),
     "spec.training.learningRate", "type number"),
    ("steps 0", edit(EXPERIMENT, "spec.training.steps", 0), "spec.training.steps", "at least 1"),
    ("everySteps 0", edit(EXPERIMENT, "spec.checkpoint.everySteps", 0), "spec.checkpoint.everySteps",
     "at least 1"),
    ("difficulty 4", edit(EXPERIMENT, "spec.task.difficulty", 4), "spec.task.difficulty", "between 1 and 3"),
    ("dropout 1", edit(EXPERIMENT, "spec.lora.dropout", 1.0), "spec.lora.dropout", "less than 1"),
    ("suspend a string", edit(EXPERIMENT, "spec.suspend", "yes"), "spec.suspend", "type boolean"),
    ("task a string", edit(EXPERIMENT, "spec.task", "gsm8k"), "spec.task", "type object"),
    ("no runtime", edit(EXPERIMENT, "spec.runtime", DELETE), "spec.runtime", "is required"),
    ("empty runtime", edit(EXPERIMENT, "spec.runtime", ""), "spec.runtime", "must not be empty"),
    ("no task name", edit(EXPERIMENT, "spec.task.name", DELETE), "spec.task.name", "is required"),
    ("no spec", edit(EXPERIMENT, "spec", DELETE), "spec", "is required"),
    ("no baseModel", edit(RUNTIME, "spec.baseModel", DELETE), "spec.baseModel", "is required"),
    ("unknown training field", edit(EXPERIMENT, "spec.training.learnRate", 1e-4), "spec.training.learnRate",
     'did you mean "learningRate"'),
    ("unknown spec field", edit(RUNTIME, "spec.gpus", 1), "spec.gpus", "unknown field"),
    ("bad lossType", edit(EXPERIMENT, "spec.training.lossType", "ppo"), "spec.training.lossType",
     '"dr_grpo"'),
    ("bad reward", edit(EXPERIMENT, "spec.task.reward", "f1"), "spec.task.reward", '"exact-match"'),
    ("bad task", edit(EXPERIMENT, "spec.task.name", "mmlu"), "spec.task.name", '"arithmetic"'),
    ("bad sampler", edit(RUNTIME, "spec.sampler", "sglang"), "spec.sampler", '"vllm"'),
    ("bad dtype", edit(RUNTIME, "spec.dtype", "fp8"), "spec.dtype", '"bfloat16"'),
    ("dtype float16", edit(RUNTIME, "spec.dtype", "float16"), "spec.dtype", '"bfloat16"'),
    ("bad attention", edit(RUNTIME, "spec.attentionImplementation", "flash"), "spec.attentionImplementation",
     '"flash_attention_2"'),
    ("gpuMemoryUtilization 1.5", edit(RUNTIME, "spec.gpuMemoryUtilization", 1.5), "spec.gpuMemoryUtilization",
     "greater than 0 and at most 1"),
    ("gpuMemoryUtilization 0", edit(RUNTIME, "spec.gpuMemoryUtilization", 0), "spec.gpuMemoryUtilization",
     "greater than 0"),
    ("maxNumSeqs 0", edit(RUNTIME, "spec.maxNumSeqs", 0), "spec.maxNumSeqs", "between 1 and 65536"),
    ("enforceEager a string", edit(RUNTIME, "spec.enforceEager", "yes"), "spec.enforceEager", "type boolean"),
    ("shmSize a list", edit(RUNTIME, "spec.shmSize", ["1Gi"]), "spec.shmSize", "an integer or a string"),
    ("maxRank 0", edit(RUNTIME, "spec.capacity.maxRank", 0), "spec.capacity.maxRank", "between 1 and 512"),
    ("maxAdapters 0", edit(RUNTIME, "spec.capacity.maxAdapters", 0), "spec.capacity.maxAdapters",
     "between 1 and 256"),
    ("bad toleration effect", edit(RUNTIME, "spec.tolerations", [{"key": "g", "effect": "Never"}]),
     "spec.tolerations[0].effect", '"NoSchedule"'),
    ("gpu limit a list", edit(RUNTIME, "spec.resources.limits", {"nvidia.com/gpu": [1]}),
     "spec.resources.limits[nvidia.com/gpu]", "an integer or a string"),
    ("gpu limit not replicas x devices", edit(edit(RUNTIME, "spec.replicas", 2), "spec.resources.limits",
                                              {"nvidia.com/gpu": 1}),
     "spec.resources.limits[nvidia.com/gpu]", "must equal replicas x devicesPerReplica"),
    ("devicesPerReplica 2", edit(RUNTIME, "spec.devicesPerReplica", 2), "spec.devicesPerReplica",
     "tensor parallel) is not built yet"),
    ("replicas 0", edit(RUNTIME, "spec.replicas", 0), "spec.replicas", "between 1 and 64"),
    ("two checkpoint volumes", edit(RUNTIME, "spec.checkpointVolume",
                                    {"hostPath": {"path": "/x"}, "emptyDir": {}}),
     "spec.checkpointVolume", "at most one"),
    ("gsm8k without dataset", edit(EXPERIMENT, "spec.task.dataset", DELETE), "spec.task.dataset",
     "dataset is required for task gsm8k"),
    ("gsm8k with a null dataset", edit(EXPERIMENT, "spec.task.dataset", None), "spec.task.dataset",
     "dataset is required for task gsm8k"),
    ("dataset with path and configMap",
     edit(EXPERIMENT, "spec.task.dataset", {"path": "/d.jsonl", "configMap": {"name": "d", "key": "k"}}),
     "spec.task.dataset", "exactly one of path, configMap"),
    ("empty dataset", edit(EXPERIMENT, "spec.task.dataset", {}), "spec.task.dataset", "exactly one"),
    ("targetModules []", edit(EXPERIMENT, "spec.lora.targetModules", []), "spec.lora.targetModules",
     "non-empty"),
    ("targetModules a word", edit(EXPERIMENT, "spec.lora.targetModules", "attention"),
     "spec.lora.targetModules", "array"),
    # kubectl must write a list: the API server refuses the scalar shorthand that clora run takes.
    ("targetModules scalar", edit(EXPERIMENT, "spec.lora.targetModules", "all-linear"),
     "spec.lora.targetModules", "array (a list: [all-linear])"),
    ("targetModules all-linear and more",
     edit(EXPERIMENT, "spec.lora.targetModules", ["all-linear", "q_proj"]),
     "spec.lora.targetModules", "may only appear alone"),
    ("targetModules nested", edit(EXPERIMENT, "spec.lora.targetModules", [[["q_proj"]]]),
     "spec.lora.targetModules[0]", "string"),
    ("targetModules a path", edit(EXPERIMENT, "spec.lora.targetModules", ["q_proj/../x"]),
     "spec.lora.targetModules[0]", "match"),
    ("configMap name a path", edit(EXPERIMENT, "spec.task.dataset", {"configMap": {
        "name": "../../victim/secrets/db-creds", "key": "k"}}), "spec.task.dataset.configMap.name", "match"),
    ("runtime in another namespace", edit(EXPERIMENT, "spec.runtime", "victim/qwen3-4b"), "spec.runtime",
     "match"),
    ("systemPrompt too long", edit(EXPERIMENT, "spec.task.systemPrompt", "x" * 16385),
     "spec.task.systemPrompt", "16384"),
    ("http without verifier", edit(EXPERIMENT, "spec.task.name", "http"), "spec.task.verifier",
     "verifier is required for task http"),
    ("verifier on gsm8k", edit(EXPERIMENT, "spec.task.verifier", {"url": "http://v:8000/score"}),
     "spec.task.verifier", "verifier is only for task http"),
    ("verifier url not http", edit(edit(EXPERIMENT, "spec.task.name", "http"), "spec.task.verifier",
                                   {"url": "ftp://v/score"}), "spec.task.verifier.url", "http"),
    ("verifier timeout 0", edit(edit(EXPERIMENT, "spec.task.name", "http"), "spec.task.verifier",
                                {"url": "http://v/score", "timeoutSeconds": 0}),
     "spec.task.verifier.timeoutSeconds", "greater than 0"),
    ("no metadata.name", edit(EXPERIMENT, "metadata.name", DELETE), "metadata.name", "is required"),
    ("bad metadata.name", edit(EXPERIMENT, "metadata.name", "Big_Name"), "metadata.name", "RFC 1123"),
    ("wrong apiVersion", edit(EXPERIMENT, "apiVersion", "clora.dev/v1"), "apiVersion", "clora.dev/v1alpha1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("obj", "path", "words"), [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS]
)
def test_bad_field_is_refused_once_with_its_path(obj: dict[str, Any], path: str, words: str) -> None:
    problems = [p for p in check_object(obj) if p.severity == "error"]
    assert len(problems) == 1, problems  # each problem reported once, not by schema and CEL both
    (problem,) = problems
    assert problem.path == path
    assert words in problem.message


def test_the_base_objects_are_valid() -> None:
    """So that each bad case above fails for its one edit only."""
    assert check_object(RUNTIME) == []
    assert check_object(EXPERIMENT) == []
    assert errors_of(RUNTIME, EXPERIMENT) == []


def test_numbers_written_as_integers_are_numbers() -> None:
    """`learningRate: 1` is a double to the API server's CEL, not a type error."""
    assert check_object(edit(EXPERIMENT, "spec.training.temperature", 1)) == []


def test_continual_experiment_needs_no_steps() -> None:
    assert check_object(edit(EXPERIMENT, "spec.training.steps", DELETE)) == []


# -- transition rules (old/new pairs) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "path", "message"),
    [
        (edit(EXPERIMENT, "spec.runtime", "other"), "spec.runtime", "runtime is immutable"),
        (edit(EXPERIMENT, "spec.lora.rank", 32), "spec.lora", "lora is immutable"),
        (edit(EXPERIMENT, "spec.lora.targetModules", ["q_proj"]), "spec.lora", "lora is immutable"),
    ],
)
def test_immutable_fields_are_refused_on_update(obj: dict[str, Any], path: str, message: str) -> None:
    problems = check_object(obj, old=EXPERIMENT)
    assert [(p.path, p.message) for p in problems] == [(path, message)]
    assert check_object(obj) == []  # on create there is nothing to compare with


def test_mutable_fields_and_defaults_pass_on_update() -> None:
    assert check_object(edit(EXPERIMENT, "spec.training.learningRate", 3e-5), old=EXPERIMENT) == []
    assert check_object(edit(EXPERIMENT, "spec.suspend", True), old=EXPERIMENT) == []
    # The old object omits lora.dropout; the API server stored its default, so writing it is no change.
    assert check_object(edit(EXPERIMENT, "spec.lora.dropout", 0.0), old=EXPERIMENT) == []


def test_cli_old_pair(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", EXPERIMENT)
    new = write(tmp_path / "new.yaml", edit(edit(EXPERIMENT, "spec.lora.rank", 8), "spec.runtime", "b"))
    other_name = write(
        tmp_path / "other.yaml", edit(edit(EXPERIMENT, "spec.runtime", "b"), "metadata.name", "y")
    )
    result = clora("validate", "-f", new, "-f", other_name, "--old", old)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if "warning:" not in line]
    assert errors == [
        f"{new}: LoRAExperiment/gsm8k-r16: spec.runtime: runtime is immutable",
        f"{new}: LoRAExperiment/gsm8k-r16: spec.lora: lora is immutable",
    ]


# -- cross-object checks -----------------------------------------------------------------------------


def test_rank_above_the_runtimes_max_rank() -> None:
    problems = errors_of(RUNTIME, edit(EXPERIMENT, "spec.lora.rank", 128))
    assert [(p.path, p.severity) for p in problems] == [("spec.lora.rank", "error")]
    assert "rank 128 is above maxRank 64" in problems[0].message


def test_rank_checked_against_the_runtimes_default_max_rank() -> None:
    runtime = edit(RUNTIME, "spec.capacity", DELETE)  # maxRank defaults to 64
    assert [p.path for p in errors_of(runtime, edit(EXPERIMENT, "spec.lora.rank", 65))] == ["spec.lora.rank"]
    assert errors_of(runtime, edit(EXPERIMENT, "spec.lora.rank", 64)) == []


def test_sampling_budget_above_the_runtimes_tokens_per_tick() -> None:
    big = edit(EXPERIMENT, "spec.training.maxNewTokens", 2048)  # 8 x 8 x 2048 = 131072 > 65536 (default)
    problems = errors_of(RUNTIME, big)
    assert [(p.path, p.severity) for p in problems] == [("spec.training", "error")]
    assert "131072 is above tokensPerTick 65536" in problems[0].message
    roomy = edit(RUNTIME, "spec.capacity.tokensPerTick", 131072)
    assert errors_of(roomy, big) == []


def test_runtime_in_another_namespace_is_not_this_one() -> None:
    runtime = edit(RUNTIME, "metadata.namespace", "team-a")
    problems = errors_of(runtime, edit(EXPERIMENT, "spec.lora.rank", 128))
    assert [(p.path, p.severity) for p in problems] == [("spec.runtime", "warning")]


def test_cli_rank_above_max_rank(tmp_path: Path) -> None:
    path = write(tmp_path / "sweep.yaml", RUNTIME, edit(EXPERIMENT, "spec.lora.rank", 128))
    result = clora("validate", "-f", path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}: LoRAExperiment/gsm8k-r16: spec.lora.rank:"
        " rank 128 is above maxRank 64 of LoRARuntime 'qwen3-4b'"
    ]


def test_cli_unknown_runtime_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "lone.yaml", EXPERIMENT)
    result = clora("validate", "-f", path)
    assert result.returncode == 0, result.stdout
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{path}: LoRAExperiment/gsm8k-r16: spec.runtime: warning: LoRARuntime 'qwen3-4b'")


def test_cli_duplicate_names(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", RUNTIME, EXPERIMENT)
    second = write(tmp_path / "b.yaml", edit(EXPERIMENT, "spec.lora.rank", 8))
    result = clora("validate", "-f", tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{second}: LoRAExperiment/gsm8k-r16: metadata.name: duplicate LoRAExperiment default/gsm8k-r16"
        f" (also in {first}, document 2)"
    ]


def test_same_name_in_two_namespaces_is_no_duplicate() -> None:
    assert (
        errors_of(RUNTIME, EXPERIMENT, edit(EXPERIMENT, "metadata.namespace", "b"))[0].severity == "warning"
    )


# -- files -------------------------------------------------------------------------------------------


def test_cli_reports_bad_fields_one_line_each(tmp_path: Path) -> None:
    bad = edit(edit(EXPERIMENT, "spec.lora.rank", 0), "spec.training.learnRate", 1)
    path = write(tmp_path / "bad.yaml", RUNTIME, bad, edit(RUNTIME, "spec.sampler", "tgi"))
    result = clora("validate", "-f", path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    # Unknown fields first: the API server prunes them before it validates.
    assert lines[0].startswith(f"{path}: LoRAExperiment/gsm8k-r16: spec.training.learnRate: unknown field")
    assert lines[1] == f"{path}: LoRAExperiment/gsm8k-r16: spec.lora.rank: must be between 1 and 512"
    assert lines[2].startswith(f"{path}: LoRARuntime/qwen3-4b: spec.sampler: must be one of")
    assert len(lines) == 4  # and the duplicate runtime
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: LoRAExperiment\nspec: [unclosed\n", "malformed YAML at line 3"),
        ("a: b: c\n", "malformed YAML at line 1, column 5"),
        ("just some words, not a manifest\n", "document 1 is not a Kubernetes object"),
        ("", "empty file"),
        ("# only a comment\n---\n", "empty file"),
    ],
    ids=["unclosed flow", "nested mapping", "plain text", "empty", "comment only"],
)
def test_cli_non_yaml_and_empty_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "input.yaml"
    path.write_text(content, encoding="utf-8")
    result = clora("validate", "-f", path)
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{path}: {message}")
    assert "Traceback" not in result.stderr


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A billion laughs: `levels` anchors, each a list of `width` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(f"    {line}" for line in lines)


_HEAD = "apiVersion: clora.dev/v1alpha1\nkind: LoRARuntime\nmetadata:\n  name: x\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_HEAD + "  annotations:\n" + _alias_bomb() + "\nspec: {baseModel: tiny}\n", "expands to more than"),
        (
            _HEAD + "  annotations:\n" + _alias_bomb(120, 1) + "\nspec: {baseModel: tiny}\n",
            "more than 100 aliases",
        ),
        (_HEAD + "  labels: &l {a: *l}\nspec: {baseModel: tiny}\n", "a cycle"),
        (_HEAD + "spec:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 100 levels"),
        (_HEAD + "spec:\n  maxAdapters: 4\n  maxAdapters: 8\n", "duplicate key 'maxAdapters'"),
    ],
    ids=["alias bomb", "many aliases", "recursive alias", "deep nesting", "duplicate key"],
)
def test_cli_hostile_yaml_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(content, encoding="utf-8")
    result = clora("validate", "-f", path)
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{path}: malformed YAML at line ") and message in line, line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("metadata", "line"),
    [
        ("[1, 2]", "LoRARuntime/<document 1>: metadata: must be a mapping (with at least a name), got list"),
        ('"abc"', "LoRARuntime/<document 1>: metadata: must be a mapping (with at least a name), got string"),
        ("{name: x, labels: [a]}", "LoRARuntime/x: metadata.labels: must be a mapping of strings to strings"),
        (
            "{name: x, annotations: {a: {b: c}}}",
            "metadata.annotations: must be a mapping of strings to strings",
        ),
        ("{name: {a: 1}}", "LoRARuntime/<document 1>: metadata.name: must be a lowercase RFC 1123 subdomain"),
    ],
    ids=["list", "string", "labels list", "annotation mapping", "name mapping"],
)
def test_cli_non_mapping_metadata_is_one_line(tmp_path: Path, metadata: str, line: str) -> None:
    path = tmp_path / "meta.yaml"
    path.write_text(
        f"apiVersion: clora.dev/v1alpha1\nkind: LoRARuntime\nmetadata: {metadata}\n"
        "spec: {baseModel: tiny}\n"
    )
    result = clora("validate", "-f", path)
    assert result.returncode == 1
    about_metadata = [x for x in result.stdout.splitlines() if ": metadata" in x]
    assert about_metadata == [f"{path}: {line}"] or (
        len(about_metadata) == 1 and line in about_metadata[0]
    ), result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["[a]", "{a: 1}"])
def test_cli_a_kind_that_is_no_string_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "kind.yaml"
    path.write_text(f"kind: {kind}\nmetadata: {{name: x}}\n")
    result = clora("validate", "-f", path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 1)


def test_cli_missing_file_and_binary_file(tmp_path: Path) -> None:
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    result = clora("validate", "-f", tmp_path / "nope.yaml", "-f", binary)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'nope.yaml'}: no such file or directory",
        f"{binary}: not a text file (not UTF-8): not YAML",
    ]
    assert "Traceback" not in result.stderr


def test_other_kinds_are_skipped_and_said_so_with_verbose(tmp_path: Path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gsm8k"}, "data": {"k": "v"}}
    path = write(tmp_path / "mixed.yaml", cm, RUNTIME, EXPERIMENT)
    quiet = clora("validate", "-f", path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    verbose = clora("validate", "-v", "-f", path)
    assert verbose.returncode == 0
    assert "skipped ConfigMap" in verbose.stderr
    assert "2 objects checked" in verbose.stderr


def test_unknown_clora_kind_is_an_error() -> None:
    typo = edit(EXPERIMENT, "kind", "LoraExperiment")
    (problem,) = errors_of(typo)
    assert problem.path == "kind" and "LoraExperiment" in problem.message


def test_stdin(tmp_path: Path) -> None:
    result = clora("validate", "-f", "-", stdin=yaml.safe_dump(edit(RUNTIME, "spec.baseModel", "")))
    assert result.returncode == 1
    assert result.stdout == "<stdin>: LoRARuntime/qwen3-4b: spec.baseModel: must not be empty\n"


def test_namespace_shows_in_the_object_name() -> None:
    (problem,) = errors_of(edit(edit(RUNTIME, "metadata.namespace", "team-a"), "spec.sampler", "x"))
    assert str(problem).startswith("in.yaml: LoRARuntime/team-a/qwen3-4b: spec.sampler: ")


# -- CEL as the API server evaluates it --------------------------------------------------------------


def test_cel_python_handles_the_constructs_the_rules_use() -> None:
    shape = "type(self) == string ? self == 'all-linear' : (type(self) == list && size(self) > 0)"
    assert cel.evaluate(shape, "all-linear") is True
    assert cel.evaluate(shape, ["q_proj"]) is True
    assert cel.evaluate(shape, []) is False
    assert cel.evaluate(shape, "attention") is False
    assert cel.evaluate("has(self.path) != has(self.configMap)", {"path": "p"}) is True
    assert cel.evaluate("has(self.path) != has(self.configMap)", {}) is False
    assert (
        cel.evaluate("self.lora == oldSelf.lora", {"lora": {"rank": 8}}, None, {"lora": {"rank": 8}}) is True
    )
    assert (
        cel.evaluate("self.lora == oldSelf.lora", {"lora": {"rank": 8}}, None, {"lora": {"rank": 4}}) is False
    )
    assert cel.is_transition_rule("self.x == oldSelf.x") and not cel.is_transition_rule("self.x > 0")


def test_cel_numbers_follow_the_schema_type() -> None:
    assert cel.evaluate("self > 0.0", 1, {"type": "number"}) is True
    with pytest.raises(cel.RuleError):
        cel.evaluate("self > 0.0", 1, {"type": "integer"})


def test_kubernetes_cel_extensions() -> None:
    assert cel.evaluate("self.isSorted() && self.sum() == 6 && self.max() == 3", [1, 2, 3]) is True
    assert cel.evaluate("self.lowerAscii() == 'q_proj' && self.indexOf('_') == 1", "Q_PROJ") is True
    assert cel.evaluate("self.split('/').join('.') == 'nvidia.com.gpu'", "nvidia.com/gpu") is True


def test_unsupported_cel_is_said_not_skipped() -> None:
    with pytest.raises(cel.UnsupportedRule, match="quantity"):
        cel.compile_rule("quantity(self).isGreaterThan(quantity('1'))")
    schema = {
        "type": "object",
        "properties": {"memory": {"type": "string"}},
        "x-kubernetes-validations": [{"rule": "quantity(self.memory).isInteger()", "message": "m"}],
    }
    from clora.validation import cel_problems

    (problem,) = cel_problems({"memory": "1Gi"}, schema, path="spec")
    assert (
        problem.severity == "warning"
        and "rule not checked" in problem.message
        and "quantity" in problem.message
    )


def test_problem_line_format() -> None:
    problem = Problem("f.yaml", "LoRAExperiment", "x", "spec.lora.rank", "must be between 1 and 512")
    assert str(problem) == "f.yaml: LoRAExperiment/x: spec.lora.rank: must be between 1 and 512"


@pytest.mark.parametrize("gpus", [8, "8"])
def test_eight_replicas_on_eight_gpus_are_valid(gpus: int | str) -> None:
    runtime = edit(edit(RUNTIME, "spec.replicas", 8), "spec.resources.limits", {"nvidia.com/gpu": gpus})
    assert [p for p in check_object(runtime) if p.severity == "error"] == []


def test_an_http_task_with_a_verifier_and_a_token_secret_is_valid() -> None:
    task = {
        "name": "http",
        "verifier": {"url": "https://verifier.example/score", "tokenSecret": {"name": "v"}},
    }
    assert [p for p in check_object(edit(EXPERIMENT, "spec.task", task)) if p.severity == "error"] == []
