"""Pipeline parallelism: DeepSpeed ``PipelineModule`` stages from one description of the layers (which export reads too)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import init_weights
from clova_train.training.distributed import Dist
from clova_train.training.ds_config import ParallelConfig
from clova_train.training.engine import Engine, compile_blocks, param_groups


class TokenEmbedding(torch.nn.Module):
    """wte alone: the first stage embeds with it, the last stage's head reuses it (tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)  # (B, T) -> (B, T, C)


class PositionEmbedding(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wpe = torch.nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = torch.nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))


def _tied_head(embedding: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, embedding.wte.weight)  # (B, T, C) -> (B, T, vocab)


@dataclass(frozen=True)
class PipeLayer:
    """One layer of the pipeline, and where its parameters live in GPT."""

    module: type
    args: tuple
    ours: str | None
    """Prefix of this layer's parameter names in GPT ("blocks.0."); None: it owns none (it reuses a tied layer's)."""
    kwargs: dict = field(default_factory=dict)
    tied: str | None = None
    """Key shared by layers that use the same module (DeepSpeed's TiedLayerSpec)."""
    forward_fn: Callable | None = None
    """A tied layer's own forward, given the shared module."""

    def param_names(self) -> list[str]:
        return list(self.param_numels())

    def param_numels(self) -> dict[str, int]:
        """Parameter name -> element count, from a build on the meta device (no memory, no initialisation cost)."""
        with torch.device("meta"):
            return {n: p.numel() for n, p in self.module(*self.args, **self.kwargs).named_parameters()}


def pipeline_plan(cfg: ModelConfig) -> list[PipeLayer]:
    """GPT as a list of pipeline layers: token embedding, positions, blocks, final norm, head tied to the embedding.

    Layer i of this list is layer i of the PipelineModule, and of its checkpoint.
    """
    from clova_train.model.gpt import Block

    return [
        PipeLayer(TokenEmbedding, (cfg,), ours="", tied="embed"),
        PipeLayer(PositionEmbedding, (cfg,), ours=""),
        *[PipeLayer(Block, (cfg,), ours=f"blocks.{i}.") for i in range(cfg.n_layer)],
        PipeLayer(torch.nn.LayerNorm, (cfg.n_embd,), ours="ln_f.", kwargs={"eps": cfg.layer_norm_eps}),
        PipeLayer(TokenEmbedding, (cfg,), ours=None, tied="embed", forward_fn=_tied_head),
    ]


def pipeline_layers(cfg: ModelConfig) -> list:
    """The pipeline plan as DeepSpeed layer specs."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = []
    for layer in pipeline_plan(cfg):
        if layer.tied:
            specs.append(TiedLayerSpec(layer.tied, layer.module, *layer.args, forward_fn=layer.forward_fn,
                                       tied_weight_attr=layer.param_names(), **layer.kwargs))
        else:
            specs.append(LayerSpec(layer.module, *layer.args, **layer.kwargs))
    return specs


def pipeline_layer_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each pipeline layer: its own parameter names (as in its checkpoint file) -> GPT names; {} if it owns none."""
    return [{n: layer.ours + n for n in layer.param_names()} if layer.ours is not None else {} for layer in pipeline_plan(cfg)]


def pipeline_names(cfg: ModelConfig) -> dict[str, str]:
    """PipelineModule parameter name -> GPT parameter name: layer i's under "i.", a tied layer's under "tied_modules.KEY."."""
    names = {}
    for i, (layer, own) in enumerate(zip(pipeline_plan(cfg), pipeline_layer_names(cfg))):
        prefix = f"tied_modules.{layer.tied}." if layer.tied else f"{i}."
        names.update({prefix + n: ours for n, ours in own.items()})
    return names


def check_partition(cfg: ModelConfig, parallel: ParallelConfig, stages: int) -> None:
    """Refuse a stage count or partition DeepSpeed would fail on, or leave a stage empty with, before any rank starts."""
    plan = pipeline_plan(cfg)
    owning = sum(layer.ours is not None for layer in plan)  # a stage holding only the tied head would own no weights
    if stages > owning:
        raise ClovaError(f"{stages} pipeline stages for {owning} layers with parameters; use fewer --pipeline-stages")
    kind, _, pattern = parallel.partition.partition(":")
    if kind != "type":
        return
    # DeepSpeed's rule: a case-insensitive search in the layer's class name; it balances the matching layers.
    matched = [layer.module.__name__ for layer in plan if re.search(pattern, layer.module.__name__, re.IGNORECASE)]
    if len(matched) < stages:
        classes = ", ".join(dict.fromkeys(layer.module.__name__ for layer in plan))
        raise ClovaError(
            f"--partition {parallel.partition} matches {len(matched)} of the pipeline's {len(plan)} layers ({classes}); "
            f"each of the {stages} stages needs one: try --partition type:Block or --partition parameters"
        )


def layer_param_counts(cfg: ModelConfig) -> list[int]:
    """Trainable parameters of each pipeline layer, from the config alone (a tied layer counts where DeepSpeed counts it)."""
    return [sum(layer.param_numels().values()) for layer in pipeline_plan(cfg)]


def _pipeline_module(cfg: ModelConfig):
    """DeepSpeed's PipelineModule, told each layer's size instead of building every layer on every rank to count it.

    Stock ``partition_method="parameters"`` builds all layers of the model on
    each rank (64 blocks of ~5 GB each for 82B) before keeping its own; here
    the counts come from meta-device builds, so a rank allocates only the
    layers of its stage.
    """
    from deepspeed.pipe import PipelineModule

    class ClovaPipelineModule(PipelineModule):
        def _count_layer_params(self):
            return layer_param_counts(cfg)

        def _get_frozen_parameter_names(self, layer):
            return []  # GPT trains every parameter; DeepSpeed would rebuild a layer spec to find out

    return ClovaPipelineModule


class PipelineEngine(Engine):
    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist):
        import deepspeed

        stages = parallel.stages(dist.world)
        module = _pipeline_module(model_cfg)(
            layers=pipeline_layers(model_cfg),
            num_stages=stages,
            loss_fn=self._loss,
            partition_method=parallel.partition,
            activation_checkpoint_interval=1 if parallel.activation_checkpointing else 0,
            # Only blocks: DeepSpeed's reentrant checkpoint of the embedding (integer ids in, no input needing
            # grad) returns a tensor without grad_fn, and backward fails on every stage.
            checkpointable_layers=["Block"],
        )
        if parallel.compile:
            compile_blocks(module.forward_funcs)
        # Layer i is drawn from seed + i, so the weights do not depend on how layers fall into stages;
        # the tied embedding is drawn alike on the first and the last stage.
        for name, child in module.named_children():
            if name == "tied_modules":
                torch.manual_seed(seed)
                child.apply(lambda m: init_weights(m, model_cfg))
            elif name.isdigit():
                torch.manual_seed(seed + int(name))
                child.apply(lambda m: init_weights(m, model_cfg))
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(module, weight_decay), config=ds_config)
        self.device = dist.device
        self.data_rank, self.data_world = self.ds.grid.get_data_parallel_rank(), self.ds.grid.get_data_parallel_world_size()

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from clova_train.model.gpt import lm_loss

        loss = lm_loss(logits, targets)
        return loss * float("nan") if self.inject_nan else loss

    def _pairs(self, micro_batches: list[torch.Tensor]):
        return iter([(mb[:, :-1].to(self.device), mb[:, 1:].to(self.device)) for mb in micro_batches])

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        # Every stage and replica gets the mean loss back (the last stage broadcasts it).
        return self.ds.train_batch(data_iter=self._pairs(micro_batches)).float()

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        mean = self.ds.eval_batch(self._pairs(micro_batches), num_micro_batches=len(micro_batches))
        self.ds.train()
        return mean.float().reshape(()) * len(micro_batches)
