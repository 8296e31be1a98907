"""The second architecture, `--arch llama`: the block against transformers' LlamaForCausalLM, document masks, and real
runs in every parallel mode on 2 gloo ranks, exported and then generated from, evaluated, p-tuned and served.

Every mode computes the same sums in the same order on this model, so the step-1 losses agree to 1e-5 (in practice
exactly, tensor parallelism aside, which changes only the order of a few float sums).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_ARGS, clova_cli, start_server, stop_server, KEY
from test_bad_input import NSMC
from test_train import metrics

REPO = Path(__file__).resolve().parents[1]
LLAMA = ["--arch", "llama", "--n-kv-head", "2", "--z-loss", "1e-4"]


def _tiny(**kw):
    from clova_train.model.config import ModelConfig

    return ModelConfig.from_name("tiny", **{"arch": "llama", "vocab_size": 512, "rope_theta": 10000.0, **kw})


def _as_hf(model, out: Path) -> Path:
    """Our model written as a Hugging Face directory by the export adapter (weights + config)."""
    from safetensors.torch import save_file

    from clova_train.model.adapter import _llama_config, to_hf

    out.mkdir()
    save_file({k: v for k, v in (to_hf(n, t.contiguous(), "llama") for n, t in model.state_dict().items())}, str(out / "model.safetensors"))
    _llama_config(model.cfg, 0, 1, "fp32").to_json_file(str(out / "config.json"))
    return out


@pytest.mark.parametrize("shape", [dict(n_kv_head=1), dict(n_kv_head=2), dict(n_kv_head=4), dict(qk_norm=True), dict(tie_embeddings=True)],
                         ids=["mqa", "gqa2", "mha", "qk_norm", "tied"])
def test_block_equals_transformers_logits_and_greedy_generation(shape, tmp_path):
    """Grouped heads (1 = multi-query, n_head = full attention), QK-norm (exported as Qwen3) and a tied head: logits equal
    transformers' to 1e-5 in fp32, and greedy decoding through our KV cache (grouped heads) equals transformers' generate."""
    from transformers import AutoModelForCausalLM

    from clova_train.model.adapter import hf_architecture
    from clova_train.model.cache import KVCache
    from clova_train.model.gpt import GPT

    cfg = _tiny(**shape)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(3)
    with torch.no_grad():  # norms away from 1, so a norm applied in the wrong place shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(_as_hf(model, tmp_path / "hf")), dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_architecture(cfg) == ("Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM")
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-5
        want = hf.generate(x[:1, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=1)[0, 8:].tolist()
        cache, got = KVCache(cfg.n_layer, 40), []
        logits = model(x[:1, :8], cache=cache)
        for _ in range(32):
            got.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[got[-1]]]), cache=cache)
    assert cache.layers[0].k.shape[1] == cfg.n_kv_head  # the cache holds only the key/value heads
    assert got == want


def test_document_mask_keeps_each_document_to_itself():
    """With the mask, a token's logits do not change when the document before it in the pack changes; without, they do."""
    from clova_train.model.gpt import GPT

    cfg = _tiny()
    model = GPT(cfg)
    model.init_weights(5)
    model.eval()
    eod = 0
    g = torch.Generator().manual_seed(2)
    second = torch.randint(1, cfg.vocab_size, (12,), generator=g)
    packs = [torch.cat([torch.randint(1, cfg.vocab_size, (n,), generator=g), torch.tensor([eod]), second])[None] for n in (9, 20)]
    with torch.no_grad():
        masked = [model(p, eod_id=eod)[0, -12:] for p in packs]
        plain = [model(p)[0, -12:] for p in packs]
        alone = model(torch.cat([torch.tensor([eod]), second])[None][:, 1:])[0]
    assert torch.allclose(masked[0], masked[1], atol=1e-5)
    assert torch.allclose(masked[0], alone, atol=1e-5)  # positions restart: as if the document stood alone
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)


def test_config_rules_and_the_gpt3_identity_is_unchanged():
    from clova_train.core.errors import ClovaError
    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import num_params
    from clova_train.training.parallel.dims import ParallelDims
    from clova_train.training.parallel.tensor import check_tensor_parallel

    gpt3 = ModelConfig.from_name("1.3b")
    # The fields of a gpt3 run's identity are those of run dirs made before llama existed, so they still resume.
    assert set(gpt3.identity()) == {"name", "n_layer", "n_embd", "n_head", "vocab_size", "block_size", "dropout", "layer_norm_eps", "init_std", "lr"}
    llama = ModelConfig.from_name("1.3b", arch="llama")
    assert (llama.n_kv_head, llama.ffn_hidden % 256, llama.tie_embeddings) == (4, 0, False)
    # SwiGLU's width keeps the block near gpt3's; the untied head adds one vocabulary x width table.
    blocks = num_params(llama) - 2 * llama.vocab_size * llama.n_embd
    assert abs(blocks / (num_params(gpt3) - gpt3.vocab_size * gpt3.n_embd - gpt3.block_size * gpt3.n_embd) - 1) < 0.02
    with pytest.raises(ClovaError, match="need arch llama"):
        ModelConfig.from_name("tiny", n_kv_head=2)
    with pytest.raises(ClovaError, match="must divide n_head"):
        ModelConfig.from_name("tiny", arch="llama", n_kv_head=3)
    with pytest.raises(ClovaError, match="1 key/value heads do not divide into 2"):
        check_tensor_parallel(_tiny(n_kv_head=1), ParallelDims(dp=1, pp=1, tp=2, zero_stage=1, pipelined=False), None)


def _run(tmp_path_factory, korean_shards, name: str, *extra) -> Path:
    run = tmp_path_factory.mktemp("llama") / name
    args = ["train", *TRAIN_ARGS, "--steps", "4", "--data", korean_shards, "--out", run, "--nproc-per-node", "2", "--no-tensorboard", *LLAMA, *extra]
    r = clova_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return run


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, korean_shards) -> dict[str, Path]:
    """The same tiny llama run (2 KV heads, z-loss on) in four layouts on 2 gloo ranks, 4 steps each."""
    return {
        "zero1": _run(tmp_path_factory, korean_shards, "zero1", "--parallel", "zero1"),
        "zero3": _run(tmp_path_factory, korean_shards, "zero3", "--deepspeed", REPO / "deepspeed_configs" / "zero3.json"),
        "pipeline": _run(tmp_path_factory, korean_shards, "pipeline", "--deepspeed", REPO / "deepspeed_configs" / "pipeline_zero1.json",
                         "--partition", "type:Block"),
        "tp2": _run(tmp_path_factory, korean_shards, "tp2", "--parallel", "zero1", "--tensor-parallel", "2"),
    }


@pytest.mark.slow
def test_llama_trains_alike_in_zero1_zero3_pipeline_and_tensor_parallel(llama_runs):
    curves = {mode: metrics(run) for mode, run in llama_runs.items()}
    first = curves["zero1"][0]["loss"]
    assert first == pytest.approx(math.log(2048), abs=0.15)  # near uniform over the padded vocabulary
    for mode, recs in curves.items():
        cfg = json.loads((llama_runs[mode] / "config.json").read_text())
        assert cfg["model"]["arch"] == "llama" and cfg["model"]["n_kv_head"] == 2 and cfg["train"]["z_loss"] == 1e-4
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        assert recs[0]["loss"] == pytest.approx(first, abs=1e-5), mode
        for r, ref in zip(recs, curves["zero1"]):
            assert r["loss"] == pytest.approx(ref["loss"], abs=1e-4), (mode, r["step"])
    assert curves["zero1"][-1]["loss"] < first  # it learns


@pytest.mark.slow
def test_llama_export_generates_evaluates_ptunes_and_serves(llama_runs, tmp_path, korean_shards):
    """`clova export` writes LlamaForCausalLM (its own check: logits on Korean text within 1e-4); our greedy generation
    equals transformers' on the export for 32 tokens; eval, ptune and serve run on it."""
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    from clova_train.inference.generate import GenerateConfig, generate_ids, load_model

    hf = tmp_path / "hf"
    r = clova_cli("export", llama_runs["zero3"], "--out", hf, "--dtype", "fp32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    meta = json.loads((hf / "clova_export.json").read_text())
    assert meta["verified"]["max_abs_diff"] <= 1e-4 and meta["verified"]["tokenizer_ids_match"]

    model, tok = load_model(hf, device="cpu")
    prompt = tok.encode("대한민국의 수도는")
    # A 4-step model soon says end-of-document; both sides are kept from it, so 32 tokens are compared.
    cfg = GenerateConfig(max_new_tokens=32, temperature=0.0, batch_size=1, logit_bias={tok.eod_id: -100.0})
    ours = generate_ids(model, tok, [prompt], cfg)[0].token_ids
    theirs = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, suppress_tokens=[tok.eod_id], pad_token_id=1)
    assert len(ours) == 32 and ours == want[0, len(prompt):].tolist()

    (tmp_path / "nsmc.tsv").write_text(NSMC, encoding="utf-8")
    r = clova_cli("eval", hf, "--task", "nsmc", "--data", tmp_path / "nsmc.tsv", "-q", "--out", tmp_path / "e.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["accuracy"] in (0.0, 50.0, 100.0)  # percent, of 2 reviews
    r = clova_cli("ptune", hf, "--task", "nsmc", "--train", tmp_path / "nsmc.tsv", "--valid", tmp_path / "nsmc.tsv",
                  "--out", tmp_path / "pt", "--prompt-tokens", "2", "--hidden-size", "8", "--epochs", "1", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "pt").is_dir()

    proc, url = start_server([hf], tmp_path / "serve.log")
    try:
        client = OpenAI(base_url=url + "/v1", api_key=KEY)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="대한민국의 수도는", max_tokens=8, temperature=0,
                                        logit_bias={str(tok.eod_id): -100})
        assert out.choices[0].text == tok.decode(ours[:8])  # greedy: the same tokens as generate_ids
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_context_extension_stage_continues_a_llama_run_and_gpt3_refuses_it(llama_runs, trained_run, tmp_path):
    """--resume with a longer --seq-len and another --rope-theta continues a llama run at the tokens it had reached;
    a gpt3 run, whose positions are learned, refuses it in one line before anything is written."""
    import shutil

    run = tmp_path / "ext"
    shutil.copytree(llama_runs["zero1"], run)
    r = clova_cli("train", "--out", run, "--resume", "--seq-len", "128", "--rope-theta", "1e6", "--steps", "6", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "context-extension stage of ext: model.rope_theta 500000.0 -> 1000000.0, seq_len 64 -> 128" in r.stdout + r.stderr
    recs = metrics(run)
    assert [(x["step"], x["tokens"]) for x in recs] == [(1, 512), (2, 1024), (3, 1536), (4, 2048), (5, 3072), (6, 4096)]
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["train"]["seq_len"], cfg["model"]["block_size"], cfg["model"]["rope_theta"]) == (128, 256, 1e6)
    # Each checkpoint exports with the RoPE base it was trained at (its marker's model), not the run's newest.
    for step, theta in ((4, 500000.0), (6, 1e6)):
        r = clova_cli("export", run, "--step", step, "--out", tmp_path / f"hf{step}", "--dtype", "fp32", "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads((tmp_path / f"hf{step}" / "config.json").read_text())["rope_parameters"]["rope_theta"] == theta

    before = sorted(p.name for p in trained_run.rglob("*"))
    r = clova_cli("train", "--out", trained_run, "--resume", "--seq-len", "128", "--steps", "20")
    assert r.returncode != 0 and "gpt3's positions are learned" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and sorted(p.name for p in trained_run.rglob("*")) == before


def test_llama3_rope_scaling_equals_transformers_and_round_trips(tmp_path):
    """Llama 3.1's frequency scaling (rope_type llama3, as Llama 3.1-3.3 and EXAONE 3.5 checkpoints carry it): logits equal
    transformers' to 1e-5 at positions past the original context, and the config reads back to the same model."""
    from transformers import AutoModelForCausalLM

    from clova_train.model.adapter import model_config_from_hf
    from clova_train.model.gpt import GPT

    cfg = _tiny(rope_theta=500000.0, rope_factor=8.0, rope_original_context=32, block_size=256)
    model = GPT(cfg)
    model.init_weights(4)
    model.eval()
    hf_dir = _as_hf(model, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-5
        plain = GPT(_tiny(rope_theta=500000.0, block_size=256))
        plain.load_state_dict(model.state_dict())
        assert (plain.eval()(x) - hf(x).logits).abs().max().item() > 1e-3  # the scaling matters at these lengths
    back = model_config_from_hf(config)
    assert (back.rope_factor, back.rope_original_context, back.rope_low_freq_factor, back.rope_high_freq_factor) == (8.0, 32, 1.0, 4.0)
