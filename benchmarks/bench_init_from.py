"""Does `--init-from` fit where the run fits? The largest rank's peak memory of one step from a source, beside the same run from seeded weights.

A random GPT2LMHeadModel or LlamaForCausalLM of the given shape is saved as
safetensors; `clova train` then runs one step at learning rate 0 on 2 CPU
ranks, once from seeded weights (a --config with the same model section) and
once with --init-from, in each mode asked. Each run is a fresh process tree:
the peak resident memory of its largest rank (``RUSAGE_CHILDREN``) and the wall
time are printed, with the source's size: a rank that held the whole model
while loading would show it as the difference.

    python benchmarks/bench_init_from.py [--arch gpt3|llama] [--n-layer 12 --n-embd 1024 --n-head 16] [--modes zero3 pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = ["--seq-len", "32", "--global-batch", "4", "--micro-batch", "2", "--steps", "1", "--lr", "0", "--warmup", "0",
       "--eval-every", "0", "--no-tensorboard", "--precision", "fp32", "--nproc-per-node", "2"]
TEMPLATES = {"zero3": "zero3.json", "pipeline": "pipeline_zero1.json"}


def inputs(d: Path):
    """A tokenizer and shards of the konlpy text (what the test suite uses)."""
    import konlpy

    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    corpus = Path(konlpy.__file__).parent / "data" / "corpus"
    files = [corpus / "kolaw" / "constitution.txt", *sorted((corpus / "kobill").glob("*.txt"))]
    train_tokenizer(files, d / "tok", TokenizerConfig(vocab_size=2000), show_progress=False)
    tokenize_corpus(files, d / "tok", d / "shards", ShardConfig(valid_fraction=0.05, workers=1), show_progress=False)


def source(d: Path, arch: str, n_layer: int, n_embd: int, n_head: int) -> tuple[Path, int]:
    """A random model of the shape with the run's own tokenizer beside it (so its rows are copied); (its dir, parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from clova_train.model.config import pad_vocab
    from clova_train.tokenizer.bpe import ClovaTokenizer

    vocab = pad_vocab(ClovaTokenizer.load(d / "tok").vocab_size)
    if arch == "gpt3":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                           activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=round(8 * n_embd / 3 / 256) * 256,
                                             num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head // 4,
                                             max_position_embeddings=64, tie_word_embeddings=False,
                                             bos_token_id=0, eos_token_id=0))
    out = d / "source"
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "tokenizer.json").write_bytes((d / "tok" / "tokenizer.json").read_bytes())
    return out, sum(p.numel() for p in model.parameters())


def measured(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB of the largest process of the tree) of `clova ARGV` in a fresh interpreter."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run([sys.executable, '-c', 'from clova_train.cli import app; app()', *sys.argv[1:]], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); "
             "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, seconds, kib = out.stdout.split()
    if code != "0":
        raise SystemExit(f"clova {' '.join(argv[:3])} failed:\n{out.stderr}")
    return float(seconds), int(kib) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["gpt3", "llama"], default="gpt3")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--modes", nargs="+", choices=list(TEMPLATES), default=list(TEMPLATES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inputs(d)
        src, params = source(d, args.arch, args.n_layer, args.n_embd, args.n_head)
        size = (src / "model.safetensors").stat().st_size / 2**30
        print(f"source: {args.arch}, {params / 1e6:.0f}M parameters, {size:.2f} GiB of safetensors (fp32); 2 CPU ranks, 1 step at lr 0")
        from clova_train.model.adapter import model_config_from_hf

        cfg = model_config_from_hf(json.loads((src / "config.json").read_text()))
        section = {k: v for k, v in cfg.__dict__.items() if k != "name"}
        (d / "model.json").write_text(json.dumps({"model": section}))
        print(f"{'mode':<9} {'start':<10} {'seconds':>8} {'largest rank peak GiB':>22}")
        for mode in args.modes:
            common = ["--data", str(d / "shards"), "--deepspeed", str(REPO / "deepspeed_configs" / TEMPLATES[mode]), *RUN]
            for label, extra in (("seeded", ["--config", str(d / "model.json")]), ("init-from", ["--init-from", str(src)])):
                seconds, peak = measured(["train", "--out", str(d / f"run-{mode}-{label}"), *extra, *common])
                print(f"{mode:<9} {label:<10} {seconds:>8.1f} {peak:>22.2f}")


if __name__ == "__main__":
    main()
