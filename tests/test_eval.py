"""Few-shot evaluation: every task family end to end, the scorer on known numbers, data and template errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.evaluation.tasks import TASKS, accuracy, bleu, f1_for, get_task, korquad_em, korquad_f1, macro_f1, read_examples
from clova_train.evaluation.prompts import TEMPLATES, load_template, sample_demos
from clova_train.evaluation.evaluate import EvalConfig, evaluate, pick_label, score_requests

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def files(task: str) -> tuple[Path, Path]:
    ext = "tsv" if TASKS[task].tsv_columns else "jsonl"
    return FIXTURES / f"{task}_train.{ext}", FIXTURES / f"{task}_test.{ext}"


def _logprob(model, tok, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) from one plain, unbatched forward: what transformers would compute."""
    ctx, cont = tok.encode(prompt), tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def _greedy(model, tok, prompt: str, max_new: int, stop: list[str]) -> str:
    ids = tok.encode(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([ids + new]))[0, -1, : tok.vocab_size].argmax())
            if t == tok.eod_id:
                break
            new.append(t)
            text = tok.decode(new)
            if any(s in text for s in stop):
                break
    text = tok.decode(new)
    cut = min([text.index(s) for s in stop if s in text], default=len(text))
    return text[:cut]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_family_runs_and_its_json_recomputes(tiny_lm, tmp_path, task):
    model, tok = tiny_lm
    train, test = files(task)
    out = tmp_path / "r.json"
    result = evaluate(model, tok, EvalConfig(task=task, data=str(test), train=str(train), shots=2, seed=1, out=str(out)), show_progress=False)
    saved = json.loads(out.read_text())
    examples = saved["examples"]
    assert len(examples) == saved["examples_scored"] == len(read_examples(TASKS[task], test))
    assert set(saved["metrics"]) == set(TASKS[task].metrics) and result["metrics"] == saved["metrics"]
    assert all(0.0 <= v <= 100.0 for v in saved["metrics"].values())
    assert all(0 <= ex["shots"] <= 2 and ex["prompt"].count("\n\n") == ex["shots"] for ex in examples)
    template = saved["template"]
    assert max(len(tok.encode(ex["prompt"])) for ex in examples) <= model.cfg.block_size
    preds, golds = [ex["prediction"] for ex in examples], [ex["gold"] for ex in examples]
    if TASKS[task].by_likelihood:
        for ex in examples:
            assert set(ex["scores"]) == set(TASKS[task].labels)
            for label, s in ex["scores"].items():
                assert s["continuation"] == " " + template["verbalizers"][label]
                assert s["logprob"] == pytest.approx(_logprob(model, tok, ex["prompt"], s["continuation"]), abs=2e-4)
            assert ex["prediction"] == max(ex["scores"], key=lambda k: ex["scores"][k]["logprob"])
            assert ex["correct"] == (ex["prediction"] == ex["gold"])
        assert saved["metrics"]["accuracy"] == pytest.approx(100 * sum(p == g for p, g in zip(preds, golds)) / len(golds))
    else:
        for ex in examples:
            assert ex["generation"] == _greedy(model, tok, ex["prompt"], template["max_new_tokens"], template["stop"])
            assert ex["prediction"] == ex["generation"].strip()
        if task == "korquad":
            assert saved["metrics"]["f1"] == pytest.approx(sum(korquad_f1(p, g) for p, g in zip(preds, golds)) / len(golds))
        else:
            assert saved["metrics"]["bleu"] == pytest.approx(bleu(preds, golds)[0]) and "nrefs:2" in saved["bleu_signature"]


class Bigram(torch.nn.Module):
    """A stand-in model whose next-token log-probabilities depend only on the previous token."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())
        self.cfg = SimpleNamespace(vocab_size=len(probs), block_size=32)

    def hidden(self, idx, *, inputs_embeds=None):
        return F.one_hot(idx, self.cfg.vocab_size).float()

    def head(self, x):
        return x @ self.table  # log-probabilities already, so log_softmax leaves them unchanged


def test_scorer_reproduces_known_log_likelihoods():
    model = Bigram([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    requests = [([0], [1, 1]), ([0, 2], [2]), ([1], [0, 2, 1]), ([2, 2, 2, 0], [0])]
    ln = torch.tensor
    expect = [
        float(ln(0.25).log() + ln(0.8).log()),
        float(ln(0.6).log()),
        float(ln(0.1).log() + ln(0.25).log() + ln(0.2).log()),
        float(ln(0.5).log()),
    ]
    for budget in (1, 6, 1000):  # one request per batch, a few, all at once
        assert score_requests(model, requests, batch_tokens=budget) == pytest.approx(expect, abs=1e-6)


def test_label_choice_sum_versus_mean():
    scores = {"0": {"logprob": -2.0, "tokens": 1}, "1": {"logprob": -3.0, "tokens": 4}}
    assert pick_label(scores, "sum") == "0"
    assert pick_label(scores, "mean") == "1"


def test_metrics_on_hand_checked_cases():
    gold = ["1", "1", "0", "0", "1"]
    pred = ["1", "0", "0", "1", "1"]
    assert accuracy(pred, gold) == pytest.approx(60.0)
    # positive class: tp 2, fp 1, fn 1 -> F1 2*2/(2*2+1+1)
    assert f1_for(pred, gold, "1") == pytest.approx(100 * 4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> 0.5; macro = (0.5 + 2/3) / 2
    assert macro_f1(pred, gold, ["0", "1", "2"]) == pytest.approx(100 * (0.5 + 4 / 6) / 2)
    assert korquad_em("'서울'.", ["부산", "서울"]) == 100.0
    assert korquad_em("서울특별시", ["서울"]) == 0.0
    # characters of "서울특별시" vs "서울": 2 shared, precision 2/5, recall 1
    assert korquad_f1("서울특별시", ["서울"]) == pytest.approx(100 * 2 * 0.4 / 1.4)
    assert korquad_f1("서울 특별시", ["서울특별 시"]) == pytest.approx(100.0)
    assert korquad_f1("부산", ["서울"]) == 0.0
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])[0] == pytest.approx(100.0)
    assert bleu(["a b c d"], [["e f g h"]])[0] == pytest.approx(0.0)


def test_demonstrations_follow_the_seed_and_never_repeat_the_example():
    train = read_examples(get_task("nsmc"), files("nsmc")[0])
    first = [sample_demos(train, 3, seed=0, index=i, example=train[0]) for i in range(5)]
    assert first == [sample_demos(train, 3, seed=0, index=i, example=train[0]) for i in range(5)]
    assert first != [sample_demos(train, 3, seed=1, index=i, example=train[0]) for i in range(5)]
    assert all(len(d) == 3 and train[0] not in d for d in first)
    with pytest.raises(ClovaError, match="cannot draw 20 demonstrations"):
        sample_demos(train, 20, seed=0, index=0, example=train[0])


def test_batching_does_not_change_scores(tiny_lm, tmp_path):
    model, tok = tiny_lm
    train, test = files("ynat")
    cfg = EvalConfig(task="ynat", data=str(test), train=str(train), shots=3, out=str(tmp_path / "a.json"))
    big = evaluate(model, tok, cfg, show_progress=False)
    small = evaluate(model, tok, replace(cfg, batch_tokens=40, out=str(tmp_path / "b.json")), show_progress=False)
    for a, b in zip(big["examples"], small["examples"]):
        assert a["prompt"] == b["prompt"]
        for label in a["scores"]:
            assert a["scores"][label]["logprob"] == pytest.approx(b["scores"][label]["logprob"], abs=1e-4)


def test_a_users_template_is_used_and_recorded(tiny_lm, tmp_path):
    model, tok = tiny_lm
    tpl = json.loads((TEMPLATES / "nsmc.json").read_text())
    tpl.update(query="영화평: {document}\n평가:", instruction="영화 리뷰의 감정을 고르세요.\n", verbalizers={"0": "나쁨", "1": "좋음"})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(tpl, ensure_ascii=False))
    train, test = files("nsmc")
    res = evaluate(model, tok, EvalConfig(task="nsmc", data=str(test), template=str(path), limit=2, out=str(tmp_path / "r.json")), show_progress=False)
    assert res["examples_scored"] == 2
    ex = res["examples"][0]
    assert ex["prompt"].startswith("영화 리뷰의 감정을 고르세요.\n영화평: ") and ex["prompt"].endswith("\n평가:")
    assert ex["scores"]["1"]["continuation"] == " 좋음" and res["template"]["query"] == tpl["query"]


def test_long_prompts_keep_only_the_demonstrations_that_fit(tiny_lm, tmp_path):
    model, tok = tiny_lm
    train, test = files("translation")
    res = evaluate(model, tok, EvalConfig(task="translation", data=str(test), train=str(train), shots=3, out=str(tmp_path / "r.json")), show_progress=False)
    assert all(ex["shots"] < 3 for ex in res["examples"])  # 64 tokens are kept for the answer of a 192-token model
    assert all(len(tok.encode(ex["prompt"])) + 64 <= model.cfg.block_size for ex in res["examples"])


def test_every_shipped_template_fits_its_task():
    for task in TASKS.values():
        tpl = load_template(task)
        assert tpl.ptune_query, task.name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"query": "{review}\n감정:"}, "unknown field"),
        ({"verbalizers": {"0": "부정"}}, "verbalizers must map exactly"),
        ({"verbalizers": {"0": "좋음", "1": "좋음"}}, "distinct"),
        ({"answer": "{label}"}, "must contain {answer}"),
        ({"ptune_query": "{document} 감정:"}, "must contain {prompt}"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_templates_are_clear_errors(tmp_path, change, message):
    tpl = json.loads((TEMPLATES / "nsmc.json").read_text())
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**tpl, **change}, ensure_ascii=False))
    with pytest.raises(ClovaError, match=message):
        load_template(get_task("nsmc"), path)


NSMC_HEAD = "id\tdocument\tlabel\n"


@pytest.mark.parametrize(
    "task, content, message",
    [
        ("nsmc", "id\ttext\tlabel\n1\t좋다\t1\n", r"columns are \['id', 'text', 'label'\]; nsmc files need the header id<TAB>document<TAB>label"),
        ("nsmc", NSMC_HEAD + "1\t좋다\n", r"bad:2: 2 tab-separated fields, expected 3"),
        ("nsmc", NSMC_HEAD + "1\t좋다\t1\n2\t싫다\t2\n", r"bad:3: unknown label '2'; nsmc labels are 0, 1"),
        ("nsmc", "", "no examples"),
        ("nsmc", NSMC_HEAD, "no examples"),
        ("ynat", '{"title": "뉴스", "label": "연예"}\n', r"unknown label '연예'; ynat labels are 0=IT과학"),
        ("ynat", '{"title": "뉴스", "label": 7}\n', "unknown label 7"),
        ("ynat", '{"headline": "뉴스", "label": 1}\n', "missing field.s. title"),
        ("ynat", '{"title": "뉴스", "label": 1}\n{"title": \n', r"bad:2: not valid JSON"),
        ("ynat", '{"title": 3, "label": 1}\n', "field 'title' must be a string"),
        ("sts", '{"sentence1": "a", "sentence2": "b", "label": 7}\n', "similarity from 0 to 5"),
        ("sts", '{"sentence1": "a", "sentence2": "b"}\n', "missing field.s. binary_label, label"),
        ("korquad", '{"context": "c", "question": "q", "answers": []}\n', "'answers' must be a non-empty"),
        ("translation", "\n\n", "no examples"),
    ],
)
def test_bad_data_files_are_clear_errors(tmp_path, task, content, message):
    path = tmp_path / "bad"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ClovaError, match=message):
        read_examples(get_task(task), path)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"task": "kobest"}, "unknown task 'kobest'"),
        ({"shots": 3}, "needs --train"),
        ({"score": "max"}, "score must be one of"),
        ({"limit": -1}, "limit must be"),
        ({"ptune": "p/", "template": "t.json"}, "drop --template"),
    ],
)
def test_eval_config_is_checked(kw, message):
    with pytest.raises(ClovaError, match=message):
        EvalConfig(**{"task": "nsmc", "data": "x.tsv", **kw})


runner = CliRunner()


def test_cli_eval_prints_a_table_and_saves_json(tiny_lm_dir, tmp_path):
    train, test = files("sts")
    out = tmp_path / "sts.json"
    res = runner.invoke(app, ["eval", str(tiny_lm_dir), "--task", "sts", "--data", str(test), "--train", str(train), "-k", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "binary f1" in res.output and "accuracy" in res.output
    assert json.loads(out.read_text())["config"]["shots"] == 1
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tdocument\n1\t좋다\n")
    res = runner.invoke(app, ["eval", str(tiny_lm_dir), "--task", "nsmc", "--data", str(bad), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "nsmc files need the header" in res.output and "Traceback" not in res.output


@pytest.fixture(scope="module")
def hf_dir(tiny_lm, tmp_path_factory) -> Path:
    """The tiny model as a Hugging Face GPT-2 directory, written with export's key map and tokenizer files."""
    from safetensors.torch import save_file

    from clova_train.model.adapter import hf_config, to_hf
    from clova_train.export.hf import write_hf_tokenizer

    model, tok = tiny_lm
    out = tmp_path_factory.mktemp("hf")
    weights = (to_hf(k, v) for k, v in model.state_dict().items())
    save_file({k: v.contiguous() for k, v in weights}, str(out / "model.safetensors"))
    hf_config(model.cfg, tok, "fp32").to_json_file(str(out / "config.json"))
    write_hf_tokenizer(tok, out, model.cfg.block_size)
    return out


def test_saved_scores_recompute_with_transformers_alone(tiny_lm, hf_dir, tmp_path):
    """The JSON's prompts and continuations, fed to GPT2LMHeadModel and AutoTokenizer, give its numbers;
    and MODEL may be such a directory (read by export.load_for_inference)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from clova_train.inference.generate import load_model

    train, test = files("nsmc")
    cfg = EvalConfig(task="nsmc", data=str(test), train=str(train), shots=2, out=str(tmp_path / "r.json"))
    model, tok = load_model(hf_dir, device="cpu")
    result = evaluate(model, tok, cfg, show_progress=False)
    assert result["examples"] == evaluate(*tiny_lm, replace(cfg, out=str(tmp_path / "s.json")), show_progress=False)["examples"]
    hf_model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    for ex in json.loads((tmp_path / "r.json").read_text())["examples"]:
        ctx = hf_tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        for s in ex["scores"].values():
            cont = hf_tok(s["continuation"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = hf_model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            assert s["logprob"] == pytest.approx(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)), abs=2e-4)
