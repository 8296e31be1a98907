"""`clova export` vs DeepSpeed's zero_to_fp32.py on the same ZeRO-3 checkpoint, side by side.

Builds a real ZeRO-3 checkpoint of a 350M-parameter model (the paper's 350M
preset: 24 layers, d_model 1024, vocabulary 51,200) with two gloo ranks on
DeepSpeed's CPU accelerator (fp32, torch AdamW, one optimizer step so the
Adam moments are in the files too), then converts it in one run with:

- ``clova export RUN --dtype fp32 --no-verify`` (what zero_to_fp32 does: fp32
  safetensors, no checks);
- ``python RUN/checkpoints/zero_to_fp32.py --safe_serialization`` (DeepSpeed's
  copy saved beside every checkpoint);
- ``clova export RUN --dtype fp32`` with its verification (for the record:
  that loads the model twice to compare logits, so it is not streaming).

Each runs in a fresh process under a tiny wrapper; peak RSS is the child's
``ru_maxrss`` (RUSAGE_CHILDREN). The checkpoint's files are read once first
so both converters find them in the page cache. The two outputs are compared
tensor by tensor. Prints peak RSS, wall time and the ratios (target: our peak
RSS <= 0.5x zero_to_fp32's).

Run: ``python benchmarks/bench_export.py [--preset 350m] [--keep DIR]``
(about 5 minutes and 10 GB of disk on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KONLPY = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "konlpy" / "data" / "corpus"

# A wrapper that barely exists, so the child's ru_maxrss is the converter's own.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
dt = time.perf_counter() - t
print(json.dumps({"rc": rc, "seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


# ---------------------------------------------------------------- a ZeRO-3 run dir, as `clova train` lays it out


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 2**31 - 1,
    }


def _worker(rank: int, world: int, port: int, args: dict) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world))  # fmt: skip
    import deepspeed
    import torch

    from clova_train.model.gpt import GPT
    from clova_train.model.config import ModelConfig

    from clova_train.training.parallel.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed()  # gloo, and no JIT-compiled shared-memory op on CPU
    cfg = ModelConfig(**args["model"])
    with deepspeed.zero.Init(config_dict_or_path=ds_config()):
        torch.manual_seed(0)
        model = GPT(cfg)  # random weights (zero.Init partitions each module as it is built)
    # Two groups, as clova train has them: the fp32 partitions are per group.
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config())
    x = torch.randint(0, cfg.vocab_size, (1, 17), generator=torch.Generator().manual_seed(rank))
    loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    engine.step()
    run = Path(args["run_dir"])
    tag = "step_00000001"
    engine.save_checkpoint(str(run / "checkpoints"), tag=tag, save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        marker = {"tag": tag, "step": 1, "tokens": 16 * world, "loss": float(loss), "valid_loss": None}
        (run / "checkpoints" / tag / "clova_checkpoint.json").write_text(json.dumps(marker))
        (run / "checkpoints" / "latest").write_text(tag)


def make_zero3_run(run: Path, model: dict, tokenizer: dict, world: int = 2) -> Path:
    import torch.multiprocessing as mp

    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = {"model": model, "train": {"steps": 1}, "data": {}, "deepspeed": ds_config(), "tokenizer": tokenizer,
              "parallel": {"mode": "zero3", "offload": "none"}}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config, indent=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, {"run_dir": str(run), "model": model}), nprocs=world, start_method="spawn")
    return run


# ---------------------------------------------------------------- measuring


def measure(cmd: list[str]) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r['rc']}")
    return r


def same_weights(ours: Path, theirs: Path) -> tuple[int, float]:
    """(tensors compared, max abs diff) between our HF export and zero_to_fp32's output, streamed."""
    from safetensors import safe_open

    from clova_train.export.weights import _hf_tensors
    from clova_train.model.adapter import from_hf

    theirs_files = {}
    for f in theirs.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            theirs_files.update({k: f for k in st.keys()})
    n, worst = 0, 0.0
    for k, t in _hf_tensors(ours):
        name, t = from_hf(k, t)
        with safe_open(str(theirs_files[name]), framework="pt") as st:
            worst = max(worst, (st.get_tensor(name) - t).abs().max().item())
        n += 1
    if n != len(theirs_files):
        raise RuntimeError(f"{n} tensors in our export, {len(theirs_files)} in zero_to_fp32's")
    return n, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="350m", help="Model preset (>= 300M parameters for the real comparison).")
    ap.add_argument("--keep", type=Path, default=None, help="Work here and keep the files (default: a temp dir, removed).")
    a = ap.parse_args()

    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import num_params
    from clova_train.tokenizer.bpe import ClovaTokenizer
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    work = a.keep or Path(tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg = ModelConfig.from_name(a.preset)
        files = [KONLPY / "kolaw" / "constitution.txt", *sorted((KONLPY / "kobill").glob("*.txt"))]
        train_tokenizer(files, work / "tok", TokenizerConfig(vocab_size=2000), show_progress=False)
        tok = ClovaTokenizer.load(work / "tok")
        run = work / "run"
        if not (run / "checkpoints" / "latest").is_file():
            t = time.perf_counter()
            make_zero3_run(run, dataclasses.asdict(cfg), {"path": str(work / "tok"), "hash": tok.hash})
            print(f"built a ZeRO-3 checkpoint of {num_params(cfg) / 1e6:.0f}M parameters on 2 CPU ranks in {time.perf_counter() - t:.0f}s")
        ckpt = run / "checkpoints" / "step_00000001"
        sizes = {p.name: p.stat().st_size for p in ckpt.iterdir()}
        for p in ckpt.iterdir():  # warm the page cache for both readers alike
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass

        clova = [str(Path(sys.executable).with_name("clova"))]
        results = {}
        for name, cmd, out in (
            ("clova export --no-verify", clova + ["export", str(run), "--dtype", "fp32", "--no-verify", "-q", "--out"], work / "ours"),
            ("zero_to_fp32.py", [sys.executable, str(run / "checkpoints" / "zero_to_fp32.py"), str(run / "checkpoints"),
                                 "--tag", ckpt.name, "--safe_serialization"], work / "theirs"),  # fmt: skip
            ("clova export (verified)", clova + ["export", str(run), "--dtype", "fp32", "-q", "--out"], work / "ours_verified"),
        ):
            shutil.rmtree(out, ignore_errors=True)
            if name.startswith("zero_to_fp32"):
                cmd = cmd[:3] + [str(out)] + cmd[3:]
            else:
                cmd = cmd + [str(out)]
            results[name] = measure(cmd)
        n, diff = same_weights(work / "ours", work / "theirs")
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    fp32_mb = num_params(cfg) * 4 / 2**20
    print(f"\nmodel: {a.preset}, {num_params(cfg):,} parameters ({fp32_mb:,.0f} MiB in fp32); checkpoint files "
          f"{sum(sizes.values()) / 2**20:,.0f} MiB over 2 ranks; outputs agree on {n} tensors (max abs diff {diff:.1e})\n")
    print(f"{'':28}{'peak RSS MiB':>14}{'wall s':>10}{'RSS / fp32 model':>18}")
    for name, r in results.items():
        print(f"{name:28}{r['peak_rss_mb']:>14,.0f}{r['seconds']:>10.1f}{r['peak_rss_mb'] / fp32_mb:>18.2f}")
    ours, theirs = results["clova export --no-verify"], results["zero_to_fp32.py"]
    rss_ratio = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    print(f"\nours / zero_to_fp32: peak RSS {rss_ratio:.2f}x (target <= 0.5x: {'met' if rss_ratio <= 0.5 else 'NOT met'}), "
          f"wall time {ours['seconds'] / theirs['seconds']:.2f}x")


if __name__ == "__main__":
    main()
