"""--freeze-except-embeddings N: for the first N steps only the embedding rows --init-from rebuilt are trained (EEVE's first stage).

Gradients are masked as they arrive (a tensor hook runs before DeepSpeed's
reduce hooks, in every mode): every parameter's to zero, except the rebuilt
rows of the token embedding and of an untied head. Adam turns a zero gradient
on zero moments into a zero update, and weight decay is off while the stage
lasts, so everything else stays bitwise as the source had it.
"""

from __future__ import annotations

import torch

from clova_train.training.initfrom.loader import VOCAB_ROWS


class FreezeStage:
    """Masks gradients during steps 1..``steps`` (call :meth:`at` before each step)."""

    def __init__(self, named_params, new_rows: list[int], steps: int, optimizer):
        self.steps, self.optimizer = steps, optimizer
        self.active = False
        self._decay = [g["weight_decay"] for g in optimizer.param_groups]
        self._handles = []
        for ours, p in named_params:
            if not p.requires_grad:
                continue
            if ours in VOCAB_ROWS:
                keep = torch.zeros(p.ds_shape[0] if hasattr(p, "ds_shape") else p.shape[0], 1, dtype=torch.bool)
                keep[new_rows] = True
                self._handles.append(p.register_hook(self._rows(keep)))
            else:
                self._handles.append(p.register_hook(self._none))

    def _none(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.active else grad

    def _rows(self, keep: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * keep.to(grad.device) if self.active else grad

        return hook

    def at(self, step: int) -> None:
        """Before step ``step``: on during the first ``steps`` steps, then off for good (hooks removed, weight decay back)."""
        active = step <= self.steps
        if active == self.active:
            return
        self.active = active
        for group, decay in zip(self.optimizer.param_groups, self._decay):
            group["weight_decay"] = 0.0 if active else decay
        if not active:
            for h in self._handles:
                h.remove()
            self._handles = []


def freeze_stage(engine, cfg, init_from: dict, steps: int, tokenizer_path: str, init=None) -> FreezeStage:
    """The stage for this rank's engine: its parameters under our names (a pipeline stage's through the layer names).

    ``init`` (the InitFrom that loaded the weights, None on a resume) already holds the graft plan.
    """
    from clova_train.training.initfrom.loader import graft_plan_for
    from clova_train.training.parallel.pipeline import PipelineEngine, pipeline_names
    from pathlib import Path

    plan, _ = init.graft() if init is not None else graft_plan_for(Path(init_from["path"]), tokenizer_path)
    names = pipeline_names(cfg) if isinstance(engine, PipelineEngine) else {}
    named = [(names.get(n, n), p) for n, p in engine.ds.module.named_parameters()]
    return FreezeStage(named, plan.new_rows(cfg.vocab_size), steps, engine.ds.optimizer)
