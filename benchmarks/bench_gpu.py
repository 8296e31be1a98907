"""One GPU, bf16: MFU of a few ZeRO-1 and ZeRO-3 steps of our engines beside transformers' model with torch's fused AdamW, for both blocks.

Part of `make gpu-check` (CUDA). The largest preset whose ZeRO-1 model states
and activations fit the card is used (1.3B on an 80 GB card), at the same
micro-batch and sequence length for every row: the gpt3 block (ours in ZeRO-1
and ZeRO-3, transformers' GPT2LMHeadModel) and the llama block (ours in ZeRO-1,
transformers' LlamaForCausalLM). FusedAdam must load (the optimizer line says
which kernel ran). Each side runs ``--warmup`` steps, then ``--steps`` timed
ones; MFU = FLOPs per token x tokens/s / peak.

    python benchmarks/bench_gpu.py [--model 1.3b] [--seq-len 2048] [--micro-batch 4] [--accum 2] [--steps 4] [--json FILE]

``--json FILE`` also writes the figures there, after each side is measured
(gpu/check.py reads them). ``--rehearse-on-cpu`` runs every row's code on the
CPU with a tiny model in fp32 (the CPU test of the GPU check), so a GPU loan is
not spent finding a broken call.
"""

from __future__ import annotations

import argparse
import json
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


def _peak_tflops(cuda: bool) -> float:
    from clova_train.training.trainer.metrics import peak_tflops

    return (peak_tflops(torch.cuda.get_device_name(), None) or 989.0) if cuda else 1.0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t0) / steps


def _peak_gib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def bench_ours(mode: str, model: ModelConfig, args, dist) -> tuple[float, str, float]:
    """(seconds per step, optimizer line, peak GiB) for one of our engines on this GPU."""
    from clova_train.training.run.config import TrainConfig
    from clova_train.training.parallel.ds_config import ParallelConfig, deepspeed_config
    from clova_train.training.trainer.loop import build_engine
    from clova_train.training.trainer.prefetch import optimizer_kernel

    cuda = dist.is_cuda
    train = TrainConfig(seq_len=args.seq_len, global_batch=args.micro_batch * args.accum, micro_batch=args.micro_batch, steps=1, lr=1e-4,
                        precision="bf16" if cuda else "fp32")
    par = ParallelConfig(mode=mode, activation_checkpointing=True)
    ds = deepspeed_config({}, train, par, world=1, cuda=cuda, tensorboard_dir=None, model=model)
    kernel = optimizer_kernel(ds, cuda=cuda)
    _reset_peak(cuda)
    engine = build_engine(model, ds, par, seed=1234, dist=dist)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g) for _ in range(args.accum)]
    seconds = _time_steps(lambda: engine.train_batch(batch), args.warmup, args.steps)
    peak = _peak_gib(cuda)
    engine = None  # frees the GPU memory (the lambda above holds it) before the next benchmark
    if cuda:
        torch.cuda.empty_cache()
    return seconds, kernel, peak


def bench_hf(model: ModelConfig, args, cuda: bool) -> tuple[float, float]:
    device = "cuda" if cuda else "cpu"
    hf = hf_twin(model).to(device)
    hf.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=cuda)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, model.vocab_size, (args.micro_batch, args.seq_len), generator=g).to(device) for _ in range(args.accum)]

    def step():
        for x in batch:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = hf(input_ids=x, labels=x).loss / len(batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _reset_peak(cuda)
    seconds = _time_steps(step, args.warmup, args.steps)
    peak = _peak_gib(cuda)
    hf = opt = None  # frees the GPU memory (the closure above holds them) before the next benchmark
    if cuda:
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
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--rehearse-on-cpu", action="store_true", help="every row's code on the CPU, tiny model, fp32, one step (the CPU test)")
    args = p.parse_args(argv)
    cuda = not args.rehearse_on_cpu
    if args.rehearse_on_cpu:
        args.model, args.seq_len, args.micro_batch, args.accum, args.warmup, args.steps = "tiny", 32, 1, 1, 0, 1
    elif not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA device (or --rehearse-on-cpu)", file=sys.stderr)
        return 2
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    name = args.model or _largest_preset(gpu_gb, args.seq_len, args.micro_batch)
    model = replace(ModelConfig.from_name(name), block_size=max(args.seq_len, 2048))
    llama = replace(ModelConfig.from_name(name, arch="llama"), block_size=model.block_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from clova_train.training.parallel.distributed import init_distributed

    dist = init_distributed()
    tokens = args.micro_batch * args.accum * args.seq_len
    peak = _peak_tflops(cuda) * 1e12
    device = torch.cuda.get_device_name() if cuda else "cpu (rehearsal, fp32)"
    print(f"{device} ({gpu_gb:.0f} GiB), {name} ({num_params(model) / 1e9:.2f}B gpt3, {num_params(llama) / 1e9:.2f}B llama), "
          f"{'bf16' if cuda else 'fp32'}, micro-batch {args.micro_batch} x {args.seq_len} x {args.accum} accumulation, activation checkpointing")
    figures = {"gpu": device, "model": name, "params": num_params(model), "params_llama": num_params(llama), "tokens_per_step": tokens,
               "peak_tflops": peak / 1e12, "rows": []}

    def record(row: dict) -> None:
        figures["rows"].append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)

    for cfg, modes in ((model, ("zero1", "zero3")), (llama, ("zero1",))):
        flops = flops_per_token(cfg, args.seq_len) * tokens
        hf_s, hf_peak = bench_hf(cfg, args, cuda)
        twin = "GPT2LMHeadModel" if cfg.arch == "gpt3" else "LlamaForCausalLM"
        print(f"  {cfg.arch}: transformers {twin} + torch AdamW: {hf_s:.3f} s/step, MFU {flops / hf_s / peak:.1%}, peak {hf_peak:.1f} GiB")
        record({"name": f"transformers {twin}", "arch": cfg.arch, "seconds_per_step": hf_s, "mfu": flops / hf_s / peak, "peak_gib": hf_peak})
        for mode in modes:
            s, kernel, mem = bench_ours(mode, cfg, args, dist)
            print(f"  {cfg.arch}: clova {mode}: {s:.3f} s/step, MFU {flops / s / peak:.1%} ({hf_s / s:.2f}x transformers), peak {mem:.1f} GiB; {kernel}")
            record({"name": f"clova {mode}" + ("" if cfg.arch == "gpt3" else " llama"), "arch": cfg.arch, "seconds_per_step": s,
                    "mfu": flops / s / peak, "peak_gib": mem, "vs_transformers": hf_s / s, "optimizer": kernel})
            if cuda and "FusedAdam" not in kernel:
                print("  FusedAdam did not load: see the line above", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
