"""Built-in tasks and rewards, and the chat prompt they are rendered into."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clora.api import Task as TaskSpec
from clora_runtime.tasks.arithmetic import ArithmeticTask
from clora_runtime.tasks.base import Problem, Task
from clora_runtime.tasks.gsm8k import Gsm8kTask, parse_records
from clora_runtime.tasks.prompts import PromptsTask, parse_prompt_records
from clora_runtime.tasks.rewards import FORMAT_INSTRUCTION, REWARDS, RewardFn, get_reward

# ConfigMap datasets are read from files the runtime pod mounts: $CLORA_CONFIGMAP_DIR/<name>/<key>.
CONFIGMAP_DIR_ENV = "CLORA_CONFIGMAP_DIR"
DEFAULT_CONFIGMAP_DIR = "/etc/clora/configmaps"

__all__ = ["REWARDS", "Problem", "RewardFn", "Task", "build_task", "chat_prompt", "get_reward"]


def build_task(spec: TaskSpec, seed: int) -> Task:
    """The task object for a spec; ValueError naming the field when it cannot be built."""
    instruction = FORMAT_INSTRUCTION if spec.reward == "format-and-exact" else ""
    if spec.name == "arithmetic":
        return ArithmeticTask(spec.difficulty, seed, instruction)
    if spec.name == "http" and spec.dataset is None:
        return PromptsTask([], seed)
    if spec.name not in ("gsm8k", "http"):
        raise ValueError(f"spec.task.name: unknown task {spec.name!r}")
    if spec.dataset is None:
        raise ValueError("spec.task.dataset: required for task gsm8k")
    if spec.dataset.path is not None:
        path = Path(spec.dataset.path)
        if not path.is_file():
            raise ValueError(f"spec.task.dataset.path: {path} is not a file in this runtime")
    else:
        assert spec.dataset.config_map is not None
        root = Path(os.environ.get(CONFIGMAP_DIR_ENV, DEFAULT_CONFIGMAP_DIR))
        path = root / spec.dataset.config_map.name / spec.dataset.config_map.key
        if not path.is_file():
            raise ValueError(f"spec.task.dataset.configMap: {path} is not mounted in this runtime")
    if spec.name == "http":
        return PromptsTask(parse_prompt_records(path.read_text(), str(path)), seed)
    return Gsm8kTask(parse_records(path.read_text(), str(path)), seed, instruction)


def chat_prompt(tokenizer: Any, user: str, system_prompt: str = "") -> list[int]:
    """Token ids of the model's chat template with an optional system message, ready for the reply."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {user}\nAnswer:"
    return list(tokenizer(text).input_ids)
