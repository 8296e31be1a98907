"""One GPU, bf16: MFU of a few ZeRO-1 and ZeRO-3 steps of our engines beside transformers' GPT2LMHeadModel with torch's fused AdamW.

Part of `make gpu-check` (CUDA only). The largest preset whose ZeRO-1 model
states and activations fit the card is used (1.3B on an 80 GB card), at the
same micro-batch and sequence length for all three; FusedAdam must load (the
optimizer line says which kernel ran). Each side runs ``--warmup`` steps, then
``--steps`` timed ones; MFU = FLOPs per token x tokens/s / peak.

    python benchmarks/bench_gpu.py [--model 1.3b] [--seq-len 2048] [--micro-batch 4] [--accum 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import replace

import torch

from bench_train_step import hf_twin
from clova_train.model.config import ModelConfig
from clova_train.model.gpt import flops_per_token, num_params
from clova_train.training.plan import PlanConfig, estimate


def _largest_preset(gpu_gb: float, seq_len: int, micro_batch: int) -> str:
    for name in ("6.9b", "1.3b", "760m", "350m", "137m"):
        plan = PlanConfig(model=name, gpus=1, gpu_mem=gpu_gb, parallel="zero1", seq_len=seq_len, micro_batch=micro_batch, activation_checkpointing=True)
        if estimate(plan)["fits"]:
            return name
    return "tiny"


def _peak_tflops() -> float:
    from clova_train.training.trainer.metrics import peak_tflops

    return peak_tflops(torch.cuda.get_device_name(), None) or 989.0


def _time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_ours(mode: str, model: ModelConfig, args, dist) -> tuple[float, str, float]:
    """(seconds per step, optimizer line, peak GiB) for one of our engines on this GPU."""
    from clova_train.training.run.config import TrainConfig
    from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config
    from clova_train.training.trainer.loop import build_engine
    from clova_train.training.trainer.prefetch import optimizer_kernel

    train = TrainConfig(seq_len=args.seq_len, global_batch=args.micro_batch * args.accum, micro_batch=args.micro_batch, steps=1, lr=1e-4, precision="bf16")
    par = ParallelConfig(mode=mode, activation_checkpointing=True)
    ds = deepspeed_config({}, train, par, world=1, cuda=True, tensorboard_dir=None, d_model=model.n_embd)
    kernel = optimizer_kernel(ds, cuda=True)
    torch.cuda.reset_peak_memory_stats()
    engine = build_engine(model, ds, par, seed=1234, dist=dist)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g) for _ in range(args.accum)]
    seconds = _time_steps(lambda: engine.train_batch(batch), args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    engine = None  # frees the GPU memory (the lambda above holds it) before the next benchmark
    torch.cuda.empty_cache()
    return seconds, kernel, peak


def bench_hf(model: ModelConfig, args) -> tuple[float, float]:
    hf = hf_twin(model).cuda()
    hf.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, model.vocab_size, (args.micro_batch, args.seq_len), generator=g).cuda() for _ in range(args.accum)]

    def step():
        for x in batch:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = hf(input_ids=x, labels=x).loss / len(batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    seconds = _time_steps(step, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    hf = opt = None  # frees the GPU memory (the closure above holds them) before the next benchmark
    torch.cuda.empty_cache()
    return seconds, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="preset (default: the largest that fits this GPU)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    name = args.model or _largest_preset(gpu_gb, args.seq_len, args.micro_batch)
    model = replace(ModelConfig.from_name(name), block_size=max(args.seq_len, 2048))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from clova_train.training.parallel.distributed import init_distributed

    dist = init_distributed()
    tokens = args.micro_batch * args.accum * args.seq_len
    flops = flops_per_token(model, args.seq_len) * tokens
    peak = _peak_tflops() * 1e12
    print(f"{torch.cuda.get_device_name()} ({gpu_gb:.0f} GiB), {name} ({num_params(model) / 1e9:.2f}B), bf16, micro-batch {args.micro_batch} x {args.seq_len} x {args.accum} accumulation, activation checkpointing")
    hf_s, hf_peak = bench_hf(model, args)
    print(f"  transformers GPT2LMHeadModel + torch fused AdamW: {hf_s:.3f} s/step, MFU {flops / hf_s / peak:.1%}, peak {hf_peak:.1f} GiB")
    for mode in ("zero1", "zero3"):
        s, kernel, mem = bench_ours(mode, model, args, dist)
        print(f"  clova {mode}: {s:.3f} s/step, MFU {flops / s / peak:.1%} ({hf_s / s:.2f}x transformers), peak {mem:.1f} GiB; {kernel}")
        if "FusedAdam" not in kernel:
            print("  FusedAdam did not load: see the line above", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
