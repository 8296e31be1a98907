"""Each rank's weights from the source directory, through the same seam as the seeded initialisation.

The engines call :meth:`InitFrom.load` where they would call ``init_weights``
or ``init_part``: ZeroEngine on the whole model (under ZeRO-3 one module at a
time, gathered, written by rank 0, so no rank holds more than one module
whole), PipelineEngine on each layer of its own stage only. Tensor parallelism
slices after loading, as it slices after initialising. Tensors are read one at
a time from the memory-mapped safetensors files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from clova_train.model.config import ModelConfig
from clova_train.training.initfrom.graft import BaseVocabulary, GraftPlan, graft_rows, plan_graft
from clova_train.training.initfrom.source import WeightReader, read_config

# Our parameters with one row per token: rebuilt when the tokenizer is not the source's.
VOCAB_ROWS = ("wte.weight", "lm_head.weight")


def base_eos(config: dict) -> int | None:
    """The base model's end-of-sequence id from its config.json (Llama 3 lists several: the first)."""
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def graft_plan_for(source: Path, tokenizer_path: str | Path) -> tuple[GraftPlan, BaseVocabulary]:
    from clova_train.tokenizer.bpe import ClovaTokenizer

    base = BaseVocabulary(source)
    config, _ = read_config(source)
    return plan_graft(ClovaTokenizer.load(tokenizer_path), base, base_eos(config)), base


class InitFrom:
    """Our parameters, read from ``info["path"]`` (a :class:`~clova_train.training.initfrom.source.SourceInfo` as a dict)."""

    def __init__(self, info: dict, cfg: ModelConfig, tokenizer_path: str | Path):
        from clova_train.model.gpt import meta_model

        self.info, self.cfg, self.tokenizer_path = info, cfg, tokenizer_path
        self.reader = WeightReader(info["path"], cfg)
        self.shapes = {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}
        self._graft: tuple[GraftPlan, BaseVocabulary] | None = None

    def graft(self) -> tuple[GraftPlan, BaseVocabulary]:
        if self._graft is None:
            self._graft = graft_plan_for(Path(self.info["path"]), self.tokenizer_path)
        return self._graft

    def tensor(self, ours: str) -> torch.Tensor:
        """Our whole parameter ``ours`` from the source (its rows grafted when the tokenizer differs)."""
        shape = self.shapes[ours]
        if ours in VOCAB_ROWS and not self.info["same_tokenizer"]:
            plan, base = self.graft()
            return graft_rows(plan, self.reader.read(ours, shape, rows=True), shape[0], base.size)
        return self.reader.read(ours, shape)

    @torch.no_grad()
    def load(self, module: torch.nn.Module, names: dict[str, str], *,
             gathered: Callable[[torch.nn.Module], contextlib.AbstractContextManager[bool]] | None = None) -> None:
        """Set every parameter of ``module`` (``names``: its parameter name -> ours) from the source, one module at a time.

        ``gathered(sub)`` (ZeRO-3) is a context in which ``sub``'s own parameters are whole; it yields whether
        this rank writes them (the others receive them).
        """
        for prefix, sub in module.named_modules():
            own = list(sub.named_parameters(recurse=False))
            if not own:
                continue
            with gathered(sub) if gathered is not None else contextlib.nullcontext(True) as writer:
                if writer:
                    for n, p in own:
                        p.data.copy_(self.tensor(names[f"{prefix}.{n}" if prefix else n]))
