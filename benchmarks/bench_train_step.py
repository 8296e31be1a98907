"""Training-step speed of our model against transformers' (SDPA) of the same block, side by side on this machine.

``--arch gpt3`` (default) against GPT2LMHeadModel, ``--arch llama`` against
LlamaForCausalLM. Both models get the same shape (the export adapter's config
of ours), the same threads, the same batch, and AdamW; a step is forward,
backward and optimizer step. Steps alternate between the two models so load
from other processes hits both alike; the median step time counts. Then the
MFU arithmetic for a 1.3B step is printed so the formula can be checked.

    python benchmarks/bench_train_step.py [--arch gpt3|llama] [--n-layer 4 --n-embd 256 --n-head 8 --vocab 8192] [--seq-len 256] [--batch 8] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clova_train.model.gpt import GPT, flops_per_token, num_params
from clova_train.model.config import ModelConfig
from clova_train.training.plan import PROFILES


def hf_twin(cfg: ModelConfig):
    """transformers' model of ``cfg`` (GPT2LMHeadModel, or LlamaForCausalLM for llama), from the export's own config."""
    from transformers import AutoModelForCausalLM

    from clova_train.model.adapter import hf_config_for

    return AutoModelForCausalLM.from_config(hf_config_for(cfg, eod_id=0, pad_id=0, dtype="fp32"), attn_implementation="sdpa", dtype=torch.float32)


def make_step(model, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def step(x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        if hf:
            loss = model(input_ids=x, labels=x).loss  # GPT-2 shifts the labels itself
        else:
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def mfu_example(seq_len: int = 2048, global_batch: int = 1024, gpus: int = 64, step_seconds: float = 2.0) -> None:
    cfg = ModelConfig.from_name("1.3b", vocab_size=51200)
    d, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, seq_len
    n = num_params(cfg, embeddings=False) + V * d
    dense, attn = 6 * n, 12 * L * T * d
    per_token = flops_per_token(cfg, T)
    tokens = global_batch * seq_len
    peak = PROFILES["a100"].peak_tflops
    achieved = per_token * tokens / step_seconds / gpus / 1e12
    print("\nMFU of a 1.3B step (ModelConfig.flops_per_token):")
    print(f"  N = non-embedding params + tied head = {num_params(cfg, embeddings=False):,} + {V}x{d} = {n:,}")
    print(f"  6N           = {dense:.4e} FLOPs/token (dense matmuls, forward + backward)")
    print(f"  12*L*T*d     = 12*{L}*{T}*{d} = {attn:.4e} FLOPs/token (QK^T and AV, causal not discounted)")
    print(f"  per token    = {per_token:.4e}   (check: {dense + attn:.4e})")
    print(f"  per step     = {per_token:.4e} x {global_batch}x{T} tokens = {per_token * tokens:.4e} FLOPs")
    print(f"  e.g. {gpus} x A100 ({peak:g} TFLOP/s bf16) taking {step_seconds:g} s per step:")
    print(f"  TFLOP/s/GPU  = {per_token * tokens:.4e} / {step_seconds:g} / {gpus} / 1e12 = {achieved:.1f}")
    print(f"  MFU          = {achieved:.1f} / {peak:g} = {achieved / peak:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("gpt3", "llama"), default="gpt3")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name="bench", arch=args.arch, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab, block_size=args.seq_len)
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    ours.init_weights()
    theirs = hf_twin(cfg).train()
    steps = {"ours": make_step(ours, hf=False), "transformers": make_step(theirs, hf=True)}
    gen = torch.Generator().manual_seed(0)
    x_ours = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    x_hf = x_ours[:, : args.seq_len].clone()  # both read seq_len input tokens (HF shifts its labels inside)
    tokens = args.batch * args.seq_len
    for name, step in steps.items():  # warm-up: allocator, optimizer state
        step(x_ours if name == "ours" else x_hf)
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step(x_ours if name == "ours" else x_hf))
    print(f"train step (forward + backward + AdamW), {cfg.arch} block, {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
          f"batch {args.batch} x {args.seq_len} tokens, {args.threads} threads, {args.steps} steps each (median):")
    tps = {}
    for name, ts in times.items():
        tps[name] = tokens / statistics.median(ts)
        print(f"  {name:13s} {tps[name]:10,.0f} tokens/s   ({statistics.median(ts) * 1e3:.1f} ms/step)")
    print(f"  ratio ours / transformers: {tps['ours'] / tps['transformers']:.2f}  (target >= 1.0)")
    mfu_example()


if __name__ == "__main__":
    main()
