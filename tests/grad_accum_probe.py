"""One rank, one process: the accumulated gradient of one step under each ZeRO stage and reduction dtype, against fp32.

Run by tests/test_parallel_modes.py as ``python tests/grad_accum_probe.py MODE...``;
prints one JSON line per (mode, precision, reduce dtype): the resolved
``data_types`` / ``communication_data_type``, the gradient's relative error
against the fp32 run of the same mode, and the gradient norm DeepSpeed reports.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accumulated_grad(mode: str, precision: str, reduce_dtype: str, batches: list[torch.Tensor], dist) -> tuple[dict, torch.Tensor, float]:
    """The resolved config, the whole fp32 gradient after the accumulation boundary, and the global norm."""
    from deepspeed.utils import safe_get_full_grad

    from clova_train.model.config import ModelConfig
    from clova_train.training.run.config import TrainConfig
    from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config
    from clova_train.training.trainer.loop import build_engine

    model = ModelConfig.from_name("tiny", vocab_size=2048, block_size=64)
    train = TrainConfig(seq_len=32, global_batch=len(batches), micro_batch=batches[0].shape[0], steps=1, lr=1e-3, precision=precision)
    par = ParallelConfig(mode=mode, reduce_dtype=reduce_dtype)
    ds_config = deepspeed_config({}, train, par, world=1, cuda=False, tensorboard_dir=None, model=model)
    engine = build_engine(model, ds_config, par, seed=1234, dist=dist)
    ds = engine.ds
    for i, mb in enumerate(batches):
        ds.backward(ds(mb[:, :-1], mb[:, 1:]))
        if i < len(batches) - 1:
            ds.step()  # not a boundary yet: DeepSpeed only counts the micro-step
    grads = [safe_get_full_grad(p) for _, p in sorted(engine.model.named_parameters())]
    flat = torch.cat([g.detach().float().reshape(-1) for g in grads])
    ds.step()
    return {k: ds_config[k] for k in ("data_types", "communication_data_type")}, flat, engine.grad_norm


def clip_norm(grads: list[torch.Tensor], dtype: torch.dtype) -> float:
    """torch.nn.utils.clip_grad_norm_'s total norm of ``grads`` (as the gradients of stand-in parameters) in ``dtype``."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g, dtype=dtype))
        p.grad = g.to(dtype)
        params.append(p)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf")))


def norms_over_steps(mode: str, steps: int, dist) -> list[tuple[float, float, float]]:
    """(the logged grad_norm, torch.nn.utils.clip_grad_norm_ on the same gradients in fp32, and in fp64) for each of ``steps`` fp32 steps of
    2 micro-batches, at an lr that makes the norm cross the clip (1.0): the gradients are read whole at the boundary,
    after the last backward and before DeepSpeed's step consumes them."""
    from deepspeed.utils import safe_get_full_grad

    from clova_train.model.config import ModelConfig
    from clova_train.training.run.config import TrainConfig
    from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config
    from clova_train.training.trainer.loop import build_engine

    model = ModelConfig.from_name("tiny", vocab_size=2048, block_size=64)
    train = TrainConfig(seq_len=32, global_batch=4, micro_batch=2, steps=steps, lr=3e-2, precision="fp32")
    par = ParallelConfig(mode=mode)
    engine = build_engine(model, deepspeed_config({}, train, par, world=1, cuda=False, tensorboard_dir=None, model=model), par, seed=1234, dist=dist)
    ds, g, pairs = engine.ds, torch.Generator().manual_seed(1), []
    for _ in range(steps):
        engine.set_lr(train.lr)
        batches = [torch.randint(0, 2048, (2, 33), generator=g) for _ in range(2)]
        for i, mb in enumerate(batches):
            ds.backward(ds(mb[:, :-1], mb[:, 1:]))
            if i < len(batches) - 1:
                ds.step()
        grads = [safe_get_full_grad(p).detach().clone().float() for _, p in sorted(engine.model.named_parameters())]
        ds.step()
        pairs.append((engine.grad_norm, *(clip_norm(grads, dtype) for dtype in (torch.float32, torch.float64))))
    return pairs


def main(modes: list[str]) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    from clova_train.training.parallel.distributed import init_distributed

    dist = init_distributed()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 2048, (1, 33), generator=g) for _ in range(16)]  # 16 micro-batches of one sequence
    if modes[0] == "norms":  # norms MODE...: the logged grad_norm against torch's on the same gradients
        for mode in modes[1:]:
            print(json.dumps({"mode": mode, "norms": norms_over_steps(mode, 6, dist)}), flush=True)
        return
    for mode in modes:
        _, ref, ref_norm = accumulated_grad(mode, "fp32", "fp32", batches, dist)
        for reduce_dtype in ("fp32", "bf16"):
            cfg, grad, norm = accumulated_grad(mode, "bf16", reduce_dtype, batches, dist)
            err = ((grad - ref).norm() / ref.norm()).item()
            print(json.dumps({"mode": mode, "reduce_dtype": reduce_dtype, **cfg, "rel_error": err, "grad_norm": norm, "ref_norm": ref_norm}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)
