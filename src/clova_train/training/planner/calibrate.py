"""`clova plan --calibrate`: the kernel efficiency of this GPU, measured on one block of the model being planned.

One block at bf16, forward and backward on (micro-batch x seq_len) tokens, timed with CUDA events after a
warm-up; its FLOPs are the model's own count for one block, so achieved / peak is the figure the step-time
model multiplies the peak by. It is stored per GPU type (:func:`~clova_train.training.planner.hardware.calibration_file`)
and every later plan for that type uses it.
"""

from __future__ import annotations

from clova_train.core.errors import ClovaError
from clova_train.training.planner.config import PlanConfig, model_config, model_facts
from clova_train.training.planner.hardware import device_profile, profile, record_efficiency

WARMUP = 3
ITERS = 10


def measure_block(cfg: PlanConfig) -> dict:
    """Time fwd + bwd of one block of ``cfg``'s model at bf16 on this process's CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise ClovaError("--calibrate measures a GPU and needs CUDA; torch sees no CUDA device here")
    from clova_train.model.gpt import Block

    m = model_config(cfg)
    facts = model_facts(m, cfg.seq_len)
    device = torch.device("cuda")
    with torch.device(device):
        block = Block(m).to(torch.bfloat16)
    x = torch.randn(cfg.micro_batch, cfg.seq_len, m.n_embd, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def once() -> None:
        block(x).backward(grad)

    for _ in range(WARMUP):
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(ITERS):
        once()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / ITERS
    # One block's training FLOPs per token: the model's recompute figure is the blocks' forward, a third of it.
    block_flops = 3 * facts.recompute_flops_per_token / m.n_layer * cfg.micro_batch * cfg.seq_len
    name = torch.cuda.get_device_name(device)
    return {"device": name, "gpu_type": device_profile(name), "seconds": seconds, "tflops": block_flops / seconds / 1e12,
            "shape": {"n_embd": m.n_embd, "n_head": m.n_head, "tokens": cfg.micro_batch * cfg.seq_len}}


def calibrate_and_record(cfg: PlanConfig) -> dict:
    """Measure, store the figure for the device's GPU type, and say so in one line."""
    got = measure_block(cfg)
    peak = cfg.peak_tflops or profile(got["gpu_type"]).peak_tflops
    eff = min(1.0, got["tflops"] / peak)
    path = record_efficiency(got["gpu_type"], eff, {"device": got["device"], "tflops": got["tflops"], "peak_tflops": peak, **got["shape"]})
    line = (f"calibrated {got['device']} ({got['gpu_type']}): one block fwd+bwd at bf16 reached {got['tflops']:.0f} TFLOP/s of "
            f"{peak:g}, kernel efficiency {eff:.0%} (stored in {path})")
    return {**got, "kernel_efficiency": eff, "line": line, "path": str(path)}

