"""Generation on a tiny GPT trained on the konlpy text: the cache, sampling, filters, files and CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.inference.generate import GenerateConfig, generate, generate_file, generate_ids, load_model, sample_next
from clova_train.model.gpt import KVCache

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["대한민국은 민주공화국이다.", "국회는", "모든 국민은 인간으로서의 존엄과 가치를 가지며,", "제1조"]


def _reference_logits(model, idx):
    """The forward pass as model.py wrote it before key/value caching existed."""
    x = model.drop(model.wte(idx) + model.wpe(torch.arange(idx.shape[1])))
    for block in model.blocks:
        attn, h = block.attn, block.ln_1(x)
        B, T, C = h.shape
        q, k, v = (t.view(B, T, model.cfg.n_head, C // model.cfg.n_head).transpose(1, 2) for t in attn.qkv(h).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + attn.resid_drop(attn.proj(y))
        x = x + block.mlp(block.ln_2(x))
    return F.linear(model.ln_f(x), model.wte.weight)


def test_plain_forward_is_bit_identical_to_the_uncached_model(tiny_lm):
    model, tok = tiny_lm
    idx = torch.tensor([tok.encode(PROMPTS[2])])
    assert torch.equal(model(idx), _reference_logits(model, idx))
    targets = torch.roll(idx, -1, 1)
    assert torch.equal(model(idx, targets), F.cross_entropy(_reference_logits(model, idx).view(-1, model.cfg.vocab_size), targets.view(-1)))


def test_cache_and_left_padding_reproduce_the_full_forward(tiny_lm):
    model, tok = tiny_lm
    ids = tok.encode(PROMPTS[2])
    idx = torch.tensor([ids])
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg.n_layer, len(ids))
        steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, len(ids))]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # The same row left-padded in a batch beside a longer one computes the same logits.
        other = tok.encode(PROMPTS[2] + " " + PROMPTS[0])
        pad = len(other) - len(ids)
        batch = torch.tensor([[tok.eod_id] * pad + ids, other])
        valid = torch.ones_like(batch, dtype=torch.bool)
        valid[0, :pad] = False
        padded = model(batch, valid=valid)
    assert not torch.isnan(padded).any()
    torch.testing.assert_close(padded[0, pad:], full[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generation_with_cache_equals_generation_without(tiny_lm, temperature):
    model, tok = tiny_lm
    cfg = GenerateConfig(max_new_tokens=20, temperature=temperature, top_k=40, top_p=0.95, seed=3, batch_size=4)
    cached = generate(model, tok, PROMPTS, cfg)
    uncached = generate(model, tok, PROMPTS, replace(cfg, use_cache=False))
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    assert [c.text for c in cached] == [c.text for c in uncached]
    assert sum(len(c.token_ids) for c in cached) > 2 * len(PROMPTS)
    if temperature == 0:
        # Greedy text does not depend on which prompts share a (left-padded) batch.
        alone = [generate(model, tok, [p], replace(cfg, batch_size=1))[0] for p in PROMPTS]
        assert [c.token_ids for c in alone] == [c.token_ids for c in cached]


def test_greedy_follows_the_argmax_and_sampling_follows_the_seed(tiny_lm):
    model, tok = tiny_lm
    ids = tok.encode(PROMPTS[0])
    greedy = generate(model, tok, [PROMPTS[0]], GenerateConfig(max_new_tokens=8, temperature=0))[0]
    expect = list(ids)
    with torch.no_grad():
        for _ in range(len(greedy.token_ids)):
            expect.append(int(model(torch.tensor([expect]))[0, -1, : tok.vocab_size].argmax()))
    assert greedy.token_ids == expect[len(ids) :]
    assert generate(model, tok, [PROMPTS[0]], GenerateConfig(max_new_tokens=8, top_k=1, seed=5))[0].token_ids == greedy.token_ids
    a, b, c = (generate(model, tok, PROMPTS, GenerateConfig(max_new_tokens=12, seed=s)) for s in (7, 7, 8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]


def test_sample_next_respects_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, GenerateConfig(temperature=0), gen).tolist()) == {1}
    assert set(sample_next(logits, GenerateConfig(top_k=2), gen).tolist()) == {1, 2}
    # 0.5 + 0.3 reaches 0.7: the nucleus is tokens 1 and 2; 0.85 needs token 3 too.
    assert set(sample_next(logits, GenerateConfig(top_p=0.7), gen).tolist()) == {1, 2}
    assert set(sample_next(logits, GenerateConfig(top_p=0.85), gen).tolist()) == {1, 2, 3}
    counts = torch.bincount(sample_next(logits, GenerateConfig(), gen), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.05, 0.5, 0.3, 0.15]), atol=0.04, rtol=0)
    cold = torch.bincount(sample_next(logits, GenerateConfig(temperature=0.25), gen), minlength=4) / 2000
    assert cold[1] > 0.85


def _sampled(model, tok, **kw):
    return generate(model, tok, PROMPTS[:2], GenerateConfig(max_new_tokens=40, temperature=0.8, seed=1, **kw))


def test_stop_sequences_end_the_text_before_them(tiny_lm):
    model, tok = tiny_lm
    free = _sampled(model, tok)
    text = max((c.text for c in free), key=len).strip()
    # Not across a U+FFFD: it marks bytes the tiny model left as no character, which no stop string can name.
    stop = next(text[i : i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    stopped = _sampled(model, tok, stop=[stop, "없는문자열"])
    assert any(c.finish_reason == "stop" for c in stopped)
    for before, after in zip(free, stopped):
        if stop in before.text:
            assert after.text == before.text[: before.text.index(stop)] and after.finish_reason == "stop"
        else:
            assert after.text == before.text


def test_banned_words_never_appear(tiny_lm):
    model, tok = tiny_lm
    free = _sampled(model, tok)
    # Real words only: U+FFFD marks bytes a tiny model left as no character, which no text filter can name.
    words = sorted({w for c in free for w in c.text.split() if len(w) >= 2 and "\ufffd" not in w}, key=lambda w: -sum(c.text.count(w) for c in free))[:2]
    assert words, [c.text for c in free]
    filtered = _sampled(model, tok, banned_words=words)
    for c in filtered:
        assert not any(w in c.text for w in words), (words, c.text)
    assert [c.text for c in filtered] != [c.text for c in free]


def test_streamed_text_is_the_completion(tiny_lm):
    model, tok = tiny_lm
    pieces: dict[int, list[str]] = {0: [], 1: []}
    cfg = GenerateConfig(max_new_tokens=30, temperature=0.8, seed=2, stop=["다.", "\n\n"])
    done = generate(model, tok, PROMPTS[:2], cfg, on_text=lambda i, t: pieces[i].append(t))
    for i, c in enumerate(done):
        assert "".join(pieces[i]) == c.text
    assert any(len(p) > 1 for p in pieces.values())


def test_batch_file_mode(tiny_lm, tmp_path):
    model, tok = tiny_lm
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "prompt": p}, ensure_ascii=False) for i, p in enumerate(PROMPTS)) + "\n\n")
    dst = tmp_path / "out.jsonl"
    cfg = GenerateConfig(max_new_tokens=6, temperature=0)
    assert generate_file(model, tok, src, dst, cfg) == len(PROMPTS)
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["completion"] for r in rows] == [c.text for c in generate(model, tok, PROMPTS, cfg)]
    assert all(r["finish_reason"] in ("eod", "stop", "length") and r["tokens"] <= 6 for r in rows)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "hi"}\n', "needs a string field 'prompt'"),
        ('{"prompt": "a"}\nnot json\n', ":2: not valid JSON"),
        ('["prompt"]\n', "expected a JSON object"),
        ("", "no prompts"),
    ],
)
def test_batch_file_errors(tiny_lm, tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    with pytest.raises(ClovaError, match=message):
        generate_file(*tiny_lm, src, tmp_path / "out.jsonl", GenerateConfig())


@pytest.mark.parametrize(
    "kw",
    [{"max_new_tokens": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}, {"batch_size": 0}, {"stop": [""]}],
)
def test_config_is_checked(kw):
    with pytest.raises(ClovaError):
        GenerateConfig(**kw)


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ClovaError, match="exceeds the model's context"):
        generate_ids(model, tok, [[5] * model.cfg.block_size], GenerateConfig(max_new_tokens=4))


def test_load_model_reads_the_plain_layout(tiny_lm, tiny_lm_dir, tmp_path):
    model, tok = tiny_lm
    loaded, loaded_tok = load_model(tiny_lm_dir, device="cpu")
    assert not loaded.training and loaded_tok.hash == tok.hash
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ClovaError, match="no such model directory"):
        load_model(tmp_path / "missing")


runner = CliRunner()


def test_cli_generate_prints_streams_and_filters(tiny_lm, tiny_lm_dir, tmp_path):
    model, tok = tiny_lm
    expect = generate(model, tok, [PROMPTS[0]], GenerateConfig(max_new_tokens=8, temperature=0))[0].text
    args = ["generate", str(tiny_lm_dir), PROMPTS[0], "-n", "8", "--temperature", "0", "--device", "cpu"]
    plain = runner.invoke(app, args)
    streamed = runner.invoke(app, [*args, "--stream"])
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    assert expect.strip() in plain.output and streamed.output == expect + "\n"
    banned = tmp_path / "banned.txt"
    banned.write_text("헌법\n\n 법률 \n")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    res = runner.invoke(app, ["generate", str(tiny_lm_dir), "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--banned-words", str(banned), "--stop", "\\n", "--seed", "4"])
    assert res.exit_code == 0, res.output
    completion = json.loads((tmp_path / "o.jsonl").read_text())["completion"]
    assert "헌법" not in completion and "법률" not in completion and "\n" not in completion


@pytest.mark.parametrize(
    "extra, message",
    [([], "either a PROMPT or --input"), (["x", "--top-p", "2"], "top_p must be"), (["-i", "in.jsonl"], "--input needs --output")],
)
def test_cli_generate_errors_are_one_line(tiny_lm_dir, extra, message):
    res = runner.invoke(app, ["generate", str(tiny_lm_dir), *extra])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output



@pytest.mark.parametrize(
    "command, flags",
    [
        ("generate", ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stream", "--stop", "--banned-words", "--input", "--output"]),
        ("eval", ["--task", "--data", "--train", "--shots", "--seed", "--limit", "--template", "--ptune", "--out", "nsmc", "ynat", "sts", "korquad", "translation"]),
        ("ptune", ["--task", "--train", "--valid", "--out", "--prompt-tokens", "--encoder", "--lr", "--epochs"]),
    ],
)
def test_cli_help_lists_the_flags(command, flags):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert [f for f in flags if f not in res.output] == []
