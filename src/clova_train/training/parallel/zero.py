"""ZeRO data parallelism, stages 1-3: one engine; under stage 3 the model is built inside ``deepspeed.zero.Init`` so no rank holds it whole."""

from __future__ import annotations

import contextlib

import torch

from clova_train.model.config import ModelConfig
from clova_train.model.gpt import GPT
from clova_train.training.parallel.dims import ParallelDims
from clova_train.training.parallel.distributed import Dist
from clova_train.training.parallel.ds_config import ParallelConfig
from clova_train.training.parallel.engine import Engine, checkpoint_blocks, compile_blocks, param_groups
from clova_train.training.parallel.tensor import TensorParallelGroups, parallelize_blocks


def _gathered_on_rank0(rank: int):
    """ZeRO-3: a unit's parameters gathered whole, written by rank 0 and broadcast, so the weights do not depend on the rank count."""
    import deepspeed

    @contextlib.contextmanager
    def gathered(module: torch.nn.Module):
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            yield rank == 0

    return gathered


class ZeroEngine(Engine):
    """ZeRO data parallelism at the stage the DeepSpeed config names (1: optimizer state, 2: + gradients, 3: + parameters)."""

    def __init__(self, model_cfg: ModelConfig, ds_config: dict, parallel: ParallelConfig, dims: ParallelDims, *, seed: int, dist: Dist,
                 init=None):
        import deepspeed

        stage = dims.zero_stage
        torch.manual_seed(seed)
        if stage == 3 and dims.tp == 1:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = GPT(model_cfg)
        else:
            # Tensor parallelism slices weights drawn whole, so every rank builds the whole model once first.
            with torch.device(dist.device):
                model = GPT(model_cfg)
        gathered = _gathered_on_rank0(dist.rank) if stage == 3 and dims.tp == 1 else None
        if init is not None:  # --init-from: the same seam, each module's tensors read from the source instead of drawn
            init.load(model, {n: n for n, _ in model.named_parameters()}, gathered=gathered)
        else:
            # Part i draws from seed + i, as PipelineEngine draws it, so all modes start from the same weights.
            model.init_weights(seed, gathered=gathered)
        mpu = None
        if dims.tp > 1:
            groups = dims.new_groups()
            mpu = TensorParallelGroups(dims, dist.rank, groups)
            parallelize_blocks(model.blocks, groups["tp"])
        if parallel.activation_checkpointing:
            checkpoint_blocks(model)
        if parallel.compile:
            compile_blocks(model)
        self.model = model
        weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay), config=ds_config, mpu=mpu)
        self.device = dist.device
        self.dims = dims
        self.data_rank, self.data_world = dims.data_rank(dist.rank), dims.dp

    def train_batch(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, mb in enumerate(micro_batches):
            mb = mb.to(self.device, non_blocking=True)
            # The last micro-batch is the boundary, said outright: DeepSpeed's own count (micro-steps modulo the
            # accumulation) falls out of step when --batch-rampup changes the accumulation mid-run.
            self.ds.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = self.ds(mb[:, :-1], mb[:, 1:], **self.loss_options)
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
            # The validation loss is the plain cross-entropy (no z-loss), under the same attention as training.
            total += self.ds(mb[:, :-1], mb[:, 1:], eod_id=self.loss_options.get("eod_id")).float()
        self.ds.train()
        return total
