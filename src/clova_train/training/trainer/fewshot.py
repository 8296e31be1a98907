"""--eval-task: few-shot tasks scored during training on the model in memory, at each evaluation.

The scoring is `clova eval`'s own (evaluation.evaluate.run_task), imported only when a run asks for a task,
on a whole copy of the weights: under ZeRO-3 every rank takes part in gathering them, and rank 0 scores. It
runs inside torch's forked RNG and reads no training data, so the training trajectory is the same with it
as without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig

EVAL_SEED = 0
"""The demonstrations' seed: `clova eval`'s default, so `clova eval --shots K` on an export draws the same ones."""


@dataclass
class TaskSpec:
    """One --eval-task TASK=DATA[:TRAIN]."""

    task: str
    data: str
    train: str = ""

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        name, sep, files = text.partition("=")
        if not sep or not name or not files:
            raise ClovaError(f"--eval-task {text!r}: expected TASK=DATA[:TRAIN], e.g. nsmc=nsmc_test.tsv:nsmc_train.tsv")
        data, _, train = files.partition(":")
        return cls(name.strip(), data, train)

    def absolute(self) -> str:
        """The spec with absolute paths, as config.json keeps it (the ranks may start elsewhere)."""
        train = f":{Path(self.train).resolve()}" if self.train else ""
        return f"{self.task}={Path(self.data).resolve()}{train}"


def check_eval_tasks(specs: list[str], shots: int) -> None:
    """The specs parse, name tasks `clova eval` knows, and have a train file when shots are asked for."""
    from clova_train.evaluation.tasks import get_task

    for text in specs:
        spec = TaskSpec.parse(text)
        get_task(spec.task)
        if shots and not spec.train:
            raise ClovaError(f"--eval-task {text!r}: --eval-shots {shots} needs demonstrations: give TASK=DATA:TRAIN")


class FewShot:
    """The --eval-task tasks of a run, read once; calling it scores them all and returns eval/TASK/METRIC fields."""

    def __init__(self, specs: list[str], *, shots: int, limit: int, model_cfg: ModelConfig, tokenizer: str, engine, rank0: bool):
        from clova_train.evaluation.prompts import load_template
        from clova_train.evaluation.tasks import get_task, read_examples
        from clova_train.tokenizer.bpe import ClovaTokenizer

        self.shots, self.model_cfg, self.engine, self.rank0 = shots, model_cfg, engine, rank0
        self.tasks = []
        for text in specs:
            spec = TaskSpec.parse(text)
            task = get_task(spec.task)
            train = read_examples(task, spec.train) if shots else []
            self.tasks.append((task, load_template(task), read_examples(task, spec.data, limit=limit), train))
        self.tok = ClovaTokenizer.load(tokenizer) if rank0 else None

    def whole_model(self):
        """A plain fp32 GPT with the current weights, on rank 0 (None elsewhere); a collective under ZeRO-3."""
        import deepspeed

        from clova_train.model.gpt import GPT

        named = dict(self.engine.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
            if not self.rank0:
                return None
            device = next(iter(named.values())).device
            with torch.device("meta"):
                model = GPT(self.model_cfg)  # shapes only: the weights come from the engine
            model = model.to_empty(device=device)
            missing, unexpected = model.load_state_dict({k: p.detach().float() for k, p in named.items()}, strict=False)
        if missing or unexpected:
            raise ClovaError(f"--eval-task: the engine's weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.float().eval()

    def __call__(self) -> dict:
        from clova_train.evaluation.evaluate import run_task

        device = self.engine.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = self.whole_model()
            if model is None:
                return {}
            fields = {}
            for task, template, examples, train in self.tasks:
                metrics, records = run_task(model, self.tok, task, template, examples, train, shots=self.shots, seed=EVAL_SEED)
                fields.update({f"eval/{task.name}/{k}": float(v) for k, v in metrics.items()})
                if task.by_likelihood:
                    # Accuracy stays flat while a small model prefers one label; the gold label's likelihood moves.
                    gold = [r["scores"][r["gold"]]["logprob"] for r in records]
                    fields[f"eval/{task.name}/gold_logprob"] = sum(gold) / len(gold)
        return fields
