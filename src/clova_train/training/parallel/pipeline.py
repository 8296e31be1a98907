"""Pipeline parallelism: DeepSpeed ``PipelineModule`` stages from one description of the layers (which export reads too)."""

from __future__ import annotations

import re
import torch

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import BLOCKS, Part, init_part, part_names, parts
from clova_train.model.loss import lm_loss
from clova_train.training.parallel.dims import ParallelDims
from clova_train.training.parallel.distributed import Dist
from clova_train.training.parallel.ds_config import ParallelConfig
from clova_train.training.parallel.engine import Engine, compile_blocks, param_groups
from clova_train.training.parallel.tensor import parallelize_blocks


def _own_names(part: Part, cfg: ModelConfig) -> dict[str, int]:
    """A part's parameter name -> element count, from a build on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return {n: p.numel() for n, p in part.module(cfg).named_parameters()}


def pipeline_layers(cfg: ModelConfig) -> list:
    """The model's parts as DeepSpeed layer specs: layer i of the PipelineModule, and of its checkpoint, is part i."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = []
    for part in parts(cfg):
        if part.tied:
            specs.append(TiedLayerSpec(part.tied, part.module, cfg, forward_fn=part.forward_fn,
                                       tied_weight_attr=list(_own_names(part, cfg))))
        else:
            specs.append(LayerSpec(part.module, cfg))
    return specs


def pipeline_layer_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each pipeline layer: its own parameter names (as in its checkpoint file) -> GPT names; {} if it owns none."""
    return part_names(cfg)


def pipeline_names(cfg: ModelConfig) -> dict[str, str]:
    """PipelineModule parameter name -> GPT parameter name: layer i's under "i.", a tied layer's under "tied_modules.KEY."."""
    names = {}
    for i, (part, own) in enumerate(zip(parts(cfg), pipeline_layer_names(cfg))):
        prefix = f"tied_modules.{part.tied}." if part.tied else f"{i}."
        names.update({prefix + n: ours for n, ours in own.items()})
    return names


def check_partition(cfg: ModelConfig, parallel: ParallelConfig, stages: int) -> None:
    """Refuse a stage count or partition DeepSpeed would fail on, or leave a stage empty with, before any rank starts."""
    plan = parts(cfg)
    owning = sum(part.name is not None for part in plan)  # a stage holding only the tied head would own no weights
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
    return [sum(_own_names(part, cfg).values()) for part in parts(cfg)]


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
    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, dims: ParallelDims, *, seed: int, dist: Dist,
                 init=None):
        import deepspeed

        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        # Axes pipe, data, model (the model axis fastest), as ParallelDims numbers the ranks. Without tensor
        # parallelism DeepSpeed's own pipe x data topology: its file names carry no model axis (layer_XX-model_states.pt).
        topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp) if dims.tp > 1 else None
        module = _pipeline_module(model_cfg)(
            layers=pipeline_layers(model_cfg),
            num_stages=dims.pp,
            topology=topology,
            loss_fn=self._loss,
            partition_method=parallel.partition,
            activation_checkpoint_interval=1 if parallel.activation_checkpointing else 0,
            # Only blocks: DeepSpeed's reentrant checkpoint of the embedding (integer ids in, no input needing
            # grad) returns a tensor without grad_fn, and backward fails on every stage.
            checkpointable_layers=[b.__name__ for b in BLOCKS],
        )
        if parallel.compile:
            compile_blocks(module.forward_funcs)
        # Layer i is part i, drawn from seed + i as GPT.init_weights draws it, so the weights do not depend on
        # how layers fall into stages; the tied embedding is drawn alike on the first and the last stage.
        # With --init-from each layer of this stage reads only its own tensors from the source.
        plan, names = parts(model_cfg), part_names(model_cfg)
        for name, child in module.named_children():
            if name == "tied_modules":
                if init is not None:
                    tied = {part.tied: own for part, own in zip(plan, names) if part.tied and own}
                    init.load(child, {f"{key}.{n}": ours for key, own in tied.items() for n, ours in own.items()})
                else:
                    init_part(child, model_cfg, seed)
            elif name.isdigit():
                if init is not None:
                    init.load(child, names[int(name)])
                else:
                    init_part(child, model_cfg, seed + int(name))
        if dims.tp > 1:
            # After initialisation: each rank keeps its slice of the weights drawn whole.
            parallelize_blocks([m for m in module.forward_funcs if isinstance(m, BLOCKS)], module._grid.get_slice_parallel_group())
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(module, weight_decay), config=ds_config)
        self.device = dist.device
        self.dims = dims
        self.data_rank, self.data_world = self.ds.grid.get_data_parallel_rank(), self.ds.grid.get_data_parallel_world_size()
        if (self.data_rank, self.data_world) != (dims.data_rank(dist.rank), dims.dp):
            raise ClovaError(f"DeepSpeed's pipeline grid puts rank {dist.rank} in replica {self.data_rank} of {self.data_world}; "
                             f"the layout ({dims.describe()}) says {dims.data_rank(dist.rank)} of {dims.dp}")

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(logits, targets, self.loss_options.get("z_loss", 0.0) if self.ds.module.training else 0.0)
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
