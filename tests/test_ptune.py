"""P-tuning on a tiny separable task: better than zero-shot, the base model untouched, a small saved prompt."""

from __future__ import annotations

import json
import re
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.evaluation.evaluate import EvalConfig, evaluate
from clova_train.evaluation.tasks import get_task, read_examples
from clova_train.evaluation.prompts import prepare, prompt_embedder
from clova_train.inference.generate import GenerateConfig, generate_ids
from clova_train.evaluation.prompts import META_FILE, VECTORS_FILE, WEIGHTS_FILE, PromptEncoder, load_prompt
from clova_train.evaluation.ptune import PTuneConfig, ptune

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
# Reviews made only of words about rights (label 1) or about institutions (label 0).
RIGHTS = ["자유", "권리", "평등", "행복", "교육"]
INSTITUTIONS = ["대통령", "국회", "정부", "법원", "선거"]


def _write_task(path: Path, n: int, rng: random.Random) -> Path:
    rows = ["id\tdocument\tlabel"]
    for i in range(n):
        label = i % 2
        # 8-12 words: the frozen model reads the label off the document through attention, and
        # with 3-6 words that signal was too weak for a prompt to find reliably (see the threshold below).
        words = [rng.choice(RIGHTS if label else INSTITUTIONS) for _ in range(rng.randint(8, 12))]
        rows.append(f"{i}\t{' '.join(words)}\t{label}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> dict[str, Path]:
    """Train and valid files of the tiny task, and a template whose answer follows the trained vectors.

    A 2-layer model trained for seconds predicts little from context, so the
    verbalizers are single common tokens and the last vectors sit right
    before the answer, where they steer the prediction most directly.
    """
    d = tmp_path_factory.mktemp("separable")
    rng = random.Random(0)
    template = {
        "query": "{document}\n답:",
        "verbalizers": {"0": "법률", "1": "국민"},
        "ptune_query": "{prompt}{document}{prompt}",
    }
    (d / "template.json").write_text(json.dumps(template, ensure_ascii=False))
    return {"train": _write_task(d / "train.tsv", 64, rng), "valid": _write_task(d / "valid.tsv", 64, rng), "template": d / "template.json"}


def _cfg(separable, out: Path, **kw) -> PTuneConfig:
    base = dict(
        task="nsmc", train=str(separable["train"]), valid=str(separable["valid"]), out=str(out),
        template=str(separable["template"]), prompt_tokens=4, hidden_size=32, epochs=20, lr=3e-3, batch_size=4,
    )
    return PTuneConfig(**{**base, **kw})


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_ptuning_beats_zero_shot_and_leaves_the_model_alone(tiny_lm, separable, tmp_path, encoder):
    model, tok = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # not the mode ptune uses, so a missing restore shows
    try:
        report = ptune(model, tok, _cfg(separable, tmp_path / "p", encoder=encoder), show_progress=False)
        assert model.training  # restored after training
    finally:
        model.eval()

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # frozen: no gradient ever reached the model
    zero = evaluate(model, tok, EvalConfig(task="nsmc", data=str(separable["valid"]), template=str(separable["template"]), out=str(tmp_path / "z.json")), show_progress=False)
    tuned = evaluate(model, tok, EvalConfig(task="nsmc", data=str(separable["valid"]), ptune=str(tmp_path / "p"), out=str(tmp_path / "t.json")), show_progress=False)
    assert report["zero_shot"] == zero["metrics"]
    assert tuned["metrics"] == report["best"]
    # Zero-shot is a coin (about 50%). The tiny model's weights, and so this accuracy, shift with the
    # CPU's kernels (AVX-512, AVX2 or none give different float rounding): over 80 variants (3 kernel
    # sets, 6 model seeds, 4 prompt seeds, both encoders) the trained prompt scored 75-100%, most runs over 85%.
    # A prompt that learned nothing rarely reaches 70% on 64 examples (chance: 50% +- 6.25%).
    assert tuned["metrics"]["accuracy"] >= 70.0
    assert tuned["metrics"]["accuracy"] >= zero["metrics"]["accuracy"] + 20.0
    assert tuned["examples"][0]["prompt"].startswith("[P][P]") and tuned["examples"][0]["prompt"].endswith("[P][P]")

    saved = {f.name for f in (tmp_path / "p").iterdir()}
    assert saved == {WEIGHTS_FILE, VECTORS_FILE, META_FILE}
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert report["bytes"] < model_bytes / 2
    meta = json.loads((tmp_path / "p" / META_FILE).read_text())
    assert meta["config"]["encoder"] == encoder and meta["best"] == report["best"] and meta["template"]["ptune_query"]


def test_gradients_reach_the_encoder_through_the_frozen_model(tiny_lm, separable):
    model, tok = tiny_lm
    task = get_task("nsmc")
    from clova_train.evaluation.prompts import load_template
    from clova_train.evaluation.evaluate import sequence_logprobs

    template = load_template(task, separable["template"])
    examples = read_examples(task, separable["train"], limit=4)
    prepared = prepare(model, tok, task, template, examples, n_vectors=4, reserve=1)
    encoder = PromptEncoder(4, model.cfg.n_embd, "lstm", 16)
    vectors = encoder()
    vectors.retain_grad()
    model.requires_grad_(False)
    try:
        lp = sequence_logprobs(model, [(p.ids, tok.encode(" 국민")) for p in prepared], prompt_embedder(model, vectors))
        lp.sum().backward()
    finally:
        model.requires_grad_(True)
    assert vectors.grad.abs().sum(dim=1).gt(0).all()  # every vector is read by the frozen model
    # The output layer starts at zero, so the gradient stops there on the first step.
    assert encoder.mlp[-1].weight.grad.abs().sum() > 0


def test_generation_tasks_ptune_and_generate_from_the_vectors(tiny_lm, tmp_path):
    model, tok = tiny_lm
    cfg = PTuneConfig(
        task="korquad", train=str(FIXTURES / "korquad_train.jsonl"), valid=str(FIXTURES / "korquad_test.jsonl"),
        out=str(tmp_path / "q"), prompt_tokens=2, hidden_size=16, epochs=1, encoder="mlp",
    )
    report = ptune(model, tok, cfg, show_progress=False)
    assert set(report["best"]) == {"exact_match", "f1"} and report["history"][0]["train_loss"] > 0
    trained = load_prompt(tmp_path / "q", model, get_task("korquad"))
    task = get_task("korquad")
    examples = read_examples(task, FIXTURES / "korquad_test.jsonl")
    ids = [p.ids for p in prepare(model, tok, task, trained.template, examples, n_vectors=2, reserve=32)]
    assert all(max(i) >= model.cfg.vocab_size for i in ids)  # the vectors' ids are in the prompts
    gen = GenerateConfig(temperature=0, max_new_tokens=10, batch_size=3)
    embed = prompt_embedder(model, trained.vectors)
    cached = generate_ids(model, tok, ids, gen, embed=embed)
    uncached = generate_ids(model, tok, ids, GenerateConfig(temperature=0, max_new_tokens=10, batch_size=3, use_cache=False), embed=embed)
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]


def test_a_prompt_only_loads_for_its_task_and_model(tiny_lm, separable, tmp_path):
    model, tok = tiny_lm
    ptune(model, tok, _cfg(separable, tmp_path / "p", epochs=1), show_progress=False)
    with pytest.raises(ClovaError, match="trained for nsmc, not ynat"):
        load_prompt(tmp_path / "p", model, get_task("ynat"))
    with pytest.raises(ClovaError, match="not a ptune directory"):
        load_prompt(tmp_path, model, get_task("nsmc"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ClovaError, match="not a ptune directory; choose another --out"):
        ptune(model, tok, _cfg(separable, tmp_path / "other"), show_progress=False)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"encoder": "gru"}, "encoder must be one of lstm, mlp"),
        ({"prompt_tokens": 0}, "prompt_tokens must be"),
        ({"lr": 0}, "lr must be > 0"),
        ({"epochs": 0}, "must be >= 1"),
        ({"task": "nli"}, "unknown task"),
        ({"valid": ""}, "needs --valid"),
    ],
)
def test_ptune_config_is_checked(separable, tmp_path, kw, message):
    with pytest.raises(ClovaError, match=message):
        _cfg(separable, tmp_path, **kw)


def test_template_without_ptune_query_is_refused(tiny_lm, separable, tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"query": "{document}\n답:", "verbalizers": {"0": "법률", "1": "국민"}}, ensure_ascii=False))
    with pytest.raises(ClovaError, match="no ptune_query"):
        ptune(*tiny_lm, _cfg(separable, tmp_path / "p", template=str(plain)), show_progress=False)


def test_cli_ptune_then_eval_with_the_prompt(tiny_lm_dir, separable, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "prompt"
    res = runner.invoke(app, [
        "ptune", str(tiny_lm_dir), "--task", "nsmc", "--train", str(separable["train"]), "--valid", str(separable["valid"]),
        "--out", str(out), "--template", str(separable["template"]), "--prompt-tokens", "4", "--hidden-size", "16",
        "--epochs", "2", "--encoder", "mlp", "--lr", "3e-3", "-q",
    ])
    assert res.exit_code == 0, res.output
    assert "zero-shot" in res.output and "p-tuned" in res.output
    assert re.search(rf"^prompt written to {re.escape(str(out))}: [\d,]+ trained parameters", res.output, re.M), res.output
    assert re.search(r"p-tuned \(epoch \d\) +│ +\d+\.\d\d%", res.output), res.output  # percentages, as eval prints them
    res = runner.invoke(app, ["eval", str(tiny_lm_dir), "--task", "nsmc", "--data", str(separable["valid"]), "--ptune", str(out), "-q"])
    assert res.exit_code == 0, res.output
    # Named as what it is, in its own file: a plain zero-shot result (eval-nsmc-0shot.json) is never overwritten.
    assert "nsmc, p-tuned" in res.output and "0-shot" not in res.output and re.search(r"accuracy +│ \d+\.\d\d%", res.output)
    assert json.loads((tmp_path / "eval-nsmc-ptuned.json").read_text())["config"]["ptune"] == str(out)
    res = runner.invoke(app, ["eval", str(tiny_lm_dir), "--task", "ynat", "--data", str(FIXTURES / "ynat_test.jsonl"), "--ptune", str(out)])
    assert res.exit_code == 2 and "trained for nsmc, not ynat" in res.output
