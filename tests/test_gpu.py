"""On a CUDA device (`make gpu-check`): bf16 ZeRO-1/ZeRO-3 training with FusedAdam and fp32 gradient sums, and export parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import clova_cli

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
GPU_ARGS = ["--model", "small", "--seq-len", "256", "--global-batch", "8", "--micro-batch", "2", "--steps", "4", "--lr", "1e-3",
            "--warmup", "1", "--save-every", "4", "--eval-every", "0", "--no-tensorboard", "--nproc-per-node", "1"]


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory, korean_shards) -> dict[str, tuple[Path, str]]:
    runs = {}
    for mode in ("zero1", "zero3"):
        run = tmp_path_factory.mktemp(mode) / "run"
        r = clova_cli("train", *GPU_ARGS, "--data", korean_shards, "--out", run, "--parallel", mode)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[mode] = (run, r.stderr)
    return runs


@pytest.mark.parametrize("mode", ["zero1", "zero3"])
def test_bf16_training_on_cuda_uses_fused_adam_and_fp32_sums(gpu_runs, mode):
    run, log = gpu_runs[mode]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["precision"] == "bf16" and cfg["run"]["device"] == torch.cuda.get_device_name()
    assert cfg["deepspeed"]["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["deepspeed"]["communication_data_type"] == "fp32"
    assert "optimizer: DeepSpeed FusedAdam" in log, log
    assert "torch_adam" not in cfg["deepspeed"]["optimizer"]["params"]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and not any(r["skipped"] for r in recs) and all(r["grad_norm"] > 0 for r in recs)
    assert recs[-1]["tflops_per_device"] > 0


def test_zero1_and_zero3_start_alike_on_cuda(gpu_runs):
    first = [json.loads((gpu_runs[m][0] / "metrics.jsonl").read_text().splitlines()[0])["loss"] for m in ("zero1", "zero3")]
    assert first[0] == pytest.approx(first[1], rel=1e-3)  # bf16 kernels, same weights and samples


@pytest.mark.parametrize("mode", ["zero1", "zero3"])
def test_export_of_a_cuda_bf16_run_matches_its_fp32_masters(gpu_runs, mode, tmp_path, tokenizer_dir, konlpy_lines):
    from transformers import GPT2LMHeadModel

    from clova_train.export.consolidate import consolidate_state_dict
    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import GPT
    from clova_train.tokenizer.bpe import ClovaTokenizer

    run = gpu_runs[mode][0]
    out = tmp_path / "hf"
    r = clova_cli("export", run, "--out", out, "--dtype", "fp32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    ours = GPT(ModelConfig(**json.loads((run / "config.json").read_text())["model"])).eval().cuda()
    ours.load_state_dict(consolidate_state_dict(run))
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval().cuda()
    ids = ClovaTokenizer.load(tokenizer_dir).encode(" ".join(konlpy_lines[:60]))
    probe = torch.tensor([ids[:128], ids[128:256]]).cuda()
    with torch.no_grad():
        assert (hf(probe).logits - ours(probe)).abs().max().item() <= 1e-3
