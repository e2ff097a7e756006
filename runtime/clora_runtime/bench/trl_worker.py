"""The TRL arm: one experiment trained by TRL's GRPOTrainer with a PEFT LoRA config.

Run as `python -m clora_runtime.bench.trl_worker REQUEST.json RESULT.json` (a WorkerRequest with one
experiment). Matched to clora as closely as TRL allows:
- same base model folder, tokenizer and chat template; same prompts in the same order (the task's
  problems for step 0, 1, ...; no shuffling), promptsPerStep prompts x groupSize completions per step;
- same LoRA rank/alpha/dropout/target modules and initialisation (PEFT's: kaiming-uniform A, zero B),
  learning rate (constant schedule), AdamW (torch's, betas 0.9/0.999, eps 1e-8, no weight decay),
  grad-norm clip 1.0, seed;
- the same loss: loss_type (grpo, dr_grpo, dapo with TRL's normalisers, which are clora's), advantages
  scaled by the group's unbiased std + 1e-4 for grpo and dapo and not for dr_grpo (scale_rewards),
  log-probabilities from logits divided by the temperature (TRL's _get_per_token_logps does, as
  clora's trainer does), clip epsilon low and high, num_iterations = updatesPerBatch, KL coefficient
  (beta) with the adapter-off model as reference (k3 in both), truncated completions trained;
- pure temperature sampling (top_k 0, top_p 1) and the same reward callables.
Where the two still differ:
- the random draws: TRL samples with transformers' generate (torch.multinomial on the global RNG),
  clora draws each row from its own generator, and the LoRA A matrices start from different random
  numbers; rewards are comparable in distribution, not pairwise;
- TRL generates through PEFT's single-adapter model over a left-padded batch, clora through its
  multi-LoRA layers with each group's prompt prefilled once: the same arithmetic up to float rounding;
- dapo's token normaliser is TRL's whole batch and clora's per adapter: the same for one experiment.
"""

from __future__ import annotations

import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clora_runtime.bench.worker import ExperimentResult, WorkerRequest, WorkerResult, peak_device_mb

_SCALE = {"grpo": "group", "dr_grpo": "none", "dapo": "none"}


def run(request: WorkerRequest) -> WorkerResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from clora_runtime.models.loading import load_model
    from clora_runtime.tasks import DatasetSource, build_task, get_reward, read_records

    if request.threads:
        torch.set_num_threads(request.threads)
    (exp,) = request.experiments
    spec = exp.spec
    t = spec.training
    steps = t.steps or 1
    base = load_model(request.model, request.device, request.dtype)
    loaded_at = time.time()
    task = build_task(spec.task, t.seed, read_records(spec.task, DatasetSource()))
    reward_fn = get_reward(spec.task.reward)

    rows: list[dict[str, Any]] = []
    for step in range(steps):
        for problem in task.problems(step, t.prompts_per_step):
            messages = (
                [{"role": "system", "content": spec.task.system_prompt}] if spec.task.system_prompt else []
            )
            messages.append({"role": "user", "content": problem.prompt})
            rows.append({"prompt": messages, "answer": problem.answer})

    def reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(reward_fn(text, ref)) for text, ref in zip(texts, answer, strict=True)]

    batch = t.prompts_per_step * t.group_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="clora-trl-"),
        max_steps=steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=batch,
        generation_batch_size=batch,
        num_generations=t.group_size,
        max_completion_length=t.max_new_tokens,
        temperature=t.temperature,
        loss_type=t.loss_type,
        scale_rewards=_SCALE[t.loss_type],
        epsilon=t.clip_epsilon,
        epsilon_high=t.clip_high,
        beta=t.kl_coef,
        num_iterations=t.updates_per_batch,
        seed=t.seed,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        use_cpu=base.device.type == "cpu",
        bf16=base.dtype == torch.bfloat16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = spec.lora
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )

    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_ends.append(time.time())

    trainer = GRPOTrainer(
        model=base.model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=base.tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimes()],
    )
    started = time.time()
    trainer.train()
    finished = time.time()
    rewards = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    marks = [started, *step_ends]
    step_seconds = [b - a for a, b in itertools.pairwise(marks)]
    return WorkerResult(
        spawned_at=request.spawned_at,
        loaded_at=loaded_at,
        finished_at=finished,
        experiments=[
            ExperimentResult(
                key=f"{exp.namespace}/{exp.name}",
                rewards=rewards,
                step_seconds=step_seconds,
                completed_at=finished,
                phase="Succeeded",
            )
        ],
        ticks=[{"active": 1, "seconds": {"step": s}} for s in step_seconds],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device_mb=peak_device_mb(),
        device=str(base.device),
    )


def main(argv: list[str]) -> int:
    request = WorkerRequest.model_validate_json(Path(argv[0]).read_text())
    Path(argv[1]).write_text(run(request).model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
