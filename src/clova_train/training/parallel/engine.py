"""The one interface the loop sees of a parallel mode (:class:`Engine`), and what the modes share."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.gpt import GPT
from clova_train.training.parallel.dims import ParallelDims


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and norm parameters (LayerNorm, RMSNorm) are not decayed (GPT-3, Megatron-LM, Llama); told by module, whatever the names."""
    from clova_train.model.llama import RMSNorm

    decay, plain, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            (plain if isinstance(module, (torch.nn.LayerNorm, RMSNorm)) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block keeps its input and recomputes the rest in backward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(blocks) -> None:
    """torch.compile each block in place (``blocks``: a GPT or a PipelineModule's block layers).

    Per block, not the whole model: ZeRO-3's parameter hooks and the pipeline's
    stage boundaries stay outside the compiled graphs, and one graph serves
    every block of the same shape.
    """
    from clova_train.model.gpt import BLOCKS

    modules = blocks.blocks if isinstance(blocks, GPT) else blocks
    for block in modules:
        if isinstance(block, BLOCKS):
            block.compile()


class Engine:
    """What the training loop needs from a parallel mode, around a DeepSpeed engine ``self.ds``."""

    ds: Any
    device: torch.device
    inject_nan: bool = False
    loss_options: dict = {}
    """Keywords of the model's training forward: eod_id under --doc-mask, z_loss (set by the loop)."""
    dims: "ParallelDims"
    """The layout this engine runs (see parallel.dims)."""
    data_rank: int
    """This rank's data-parallel replica, and how many there are: they split each global batch."""
    data_world: int

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Forward, backward and one optimizer step over this replica's share; the mean loss."""
        raise NotImplementedError

    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the micro-batch mean losses, no gradients."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    @property
    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    @property
    def monitor(self):
        return self.ds.monitor

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        # `latest` is ours to write once the checkpoint is complete (see checkpoint.Checkpointer).
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: Path, tag: str) -> dict:
        path, client = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ClovaError(f"{directory / tag}: DeepSpeed could not load this checkpoint")
        return client
