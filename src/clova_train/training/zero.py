"""ZeRO data parallelism, stages 1-3: one engine; under stage 3 the model is built inside ``deepspeed.zero.Init`` so no rank holds it whole."""

from __future__ import annotations

import torch

from clova_train.model.config import ModelConfig
from clova_train.model.gpt import GPT, MLP, CausalSelfAttention, init_weights
from clova_train.training.distributed import Dist
from clova_train.training.ds_config import ParallelConfig
from clova_train.training.engine import Engine, checkpoint_blocks, compile_blocks, param_groups

# Modules whose parameters init_weights sets; under zero.Init each is gathered once.
_INIT_UNITS = (CausalSelfAttention, MLP, torch.nn.Embedding, torch.nn.LayerNorm)


def _layer_units(model: GPT) -> list[torch.nn.Module]:
    """The model in pipeline layer order (see pipeline_layers): wte, wpe, blocks, ln_f."""
    return [model.wte, model.wpe, *model.blocks, model.ln_f]


def _initialize_partitioned(model: GPT, cfg: ModelConfig, seed: int, rank: int, *, partitioned: bool = True) -> None:
    """Apply GPT-3 initialisation, the same whatever the stage or the number of ranks.

    zero.Init partitions each submodule as soon as it is built, so GPT's own
    ``init_weights`` pass finds empty tensors for everything but its direct
    parameters. Rank 0 draws each unit in full and DeepSpeed broadcasts it, so
    the weights do not depend on the number of ranks; layer i is drawn from
    ``seed + i`` in pipeline layer order, as PipelineEngine draws it, so all
    modes start from the same weights. Unpartitioned (ZeRO-1/2), every rank
    draws the same values itself.
    """
    import deepspeed

    for i, layer in enumerate(_layer_units(model)):
        torch.manual_seed(seed + i)
        for module in layer.modules():
            if isinstance(module, _INIT_UNITS):
                if not partitioned:
                    init_weights(module, cfg)
                    continue
                with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                    if rank == 0:
                        init_weights(module, cfg)


class ZeroEngine(Engine):
    """ZeRO data parallelism at the stage the DeepSpeed config names (1: optimizer state, 2: + gradients, 3: + parameters)."""

    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, *, seed: int, dist: Dist):
        import deepspeed

        stage = ds_config["zero_optimization"]["stage"]
        torch.manual_seed(seed)
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = GPT(model_cfg)
        else:
            with torch.device(dist.device):
                model = GPT(model_cfg)
        _initialize_partitioned(model, model_cfg, seed, dist.rank, partitioned=stage == 3)
        if parallel.activation_checkpointing:
            checkpoint_blocks(model)
        if parallel.compile:
            compile_blocks(model)
        self.model = model
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay), config=ds_config)
        self.device = dist.device
        self.data_rank, self.data_world = dist.rank, dist.world

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device, non_blocking=True)
            loss = self.ds(mb[:, :-1], mb[:, 1:])
            if self.inject_nan:
                loss = loss * float("nan")
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        return total / len(micro_batches)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        self.ds.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device, non_blocking=True)
            total += self.ds(mb[:, :-1], mb[:, 1:]).float()
        self.ds.train()
        return total
