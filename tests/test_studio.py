"""The studio on `clova serve`: the input-gradient API against transformers' autograd, `clova ptune --server`
against local p-tuning, and no-code p-tuning jobs and presets in the playground (real Chromium)."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
import math
from pathlib import Path

import pytest
import torch

from clova_train.evaluation.prompts import META_FILE, VECTORS_FILE
import test_ptune
from test_ptune import _cfg
from test_serve import CHROMIUM, HANGUL, KEY, MODEL, _get, _post, generate_in_playground, start_server, stop_server

separable = test_ptune.separable  # the fixture, shared (an assignment: tests taking it as an argument do not shadow an import)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def studio(tiny_hf_dir, tmp_path_factory):
    """`clova serve` with an input filter and no state dir (gradients need none); yields {"url", "log"}."""
    d = tmp_path_factory.mktemp("studio")
    (d / "filters.json").write_text(json.dumps({"input_banned_words": ["금지어"]}), encoding="utf-8")
    proc, url = start_server([tiny_hf_dir, "--filters", d / "filters.json"], d / "server.log")
    yield {"url": url, "log": d / "server.log"}
    stop_server(proc)


# ---------------------------------------------------------------- /v1/ptune/gradients


def _hf_reference(hf, tok, vectors: torch.Tensor, examples: list[dict], score: str) -> tuple[float, torch.Tensor]:
    """Loss and d loss / d vectors by transformers' autograd: each text encoded on its own, the vectors
    written into the input embeddings where the segments put them."""
    vectors = vectors.clone().requires_grad_(True)
    wte = hf.get_input_embeddings()
    losses = []
    for ex in examples:
        rows = []
        for seg in ex["segments"]:
            rows += [vectors[seg][None]] if isinstance(seg, int) else [wte(torch.tensor(tok.encode(seg)))]
        context = torch.cat(rows)  # (T, C)
        conts = [ex["target"]] if "target" in ex else ex["choices"]
        scores = []
        for cont in conts:
            ids = tok.encode(cont)
            x = torch.cat([context, wte(torch.tensor(ids))])[None]  # (1, T + n, C)
            logp = hf(inputs_embeds=x).logits[0].float().log_softmax(-1)  # (T + n, vocab)
            picked = logp[len(context) - 1 : len(context) - 1 + len(ids)].gather(1, torch.tensor(ids)[:, None]).sum()
            scores.append(picked / len(ids) if score == "mean" else picked)
        scores = torch.stack(scores)
        losses.append(-scores[0] if "target" in ex else torch.nn.functional.cross_entropy(scores[None], torch.tensor([ex["gold"]])))
    loss = torch.stack(losses).mean()
    (grad,) = torch.autograd.grad(loss, vectors)
    return loss.item(), grad


EXAMPLES = [
    {"segments": [0, "대한민국의 국회는", 1, 2], "target": " 법률을 제정한다"},
    {"segments": ["모든 국민은", 3, " 자유를 가진다.", 0], "choices": [" 부정", " 긍정"], "gold": 1},
    {"segments": [1, 1, "대통령은 국가의 원수이다.", 2, 3], "choices": [" 정치", " 경제", " 사회"], "gold": 0},
    {"segments": ["헌법", 3], "target": " 제1조"},
]


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_gradients_match_transformers_autograd(studio, tiny_hf_dir, score):
    from transformers import AutoModelForCausalLM

    from clova_train.inference.generate import load_model

    tok = load_model(tiny_hf_dir, device="cpu")[1]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), torch_dtype=torch.float32).eval()
    hf.requires_grad_(False)
    width = hf.config.n_embd
    vectors = 0.05 * torch.randn(4, width, generator=torch.Generator().manual_seed(1))
    for examples in (EXAMPLES[:1], EXAMPLES[1:3], EXAMPLES):  # target only, choices only, both
        status, r = _post(studio["url"] + "/v1/ptune/gradients", {"vectors": vectors.tolist(), "examples": examples, "score": score})
        assert status == 200, r
        loss, grad = _hf_reference(hf, tok, vectors, examples, score)
        assert r["loss"] == pytest.approx(loss, abs=1e-5)
        got = torch.tensor(r["grad"])
        assert got.shape == (4, width) and grad.abs().max() > 0
        assert (got - grad).abs().max() <= 1e-4 * grad.abs().max()
        assert r["tokens"] == sum(
            len([t for s in ex["segments"] for t in (tok.encode(s) if isinstance(s, str) else [s])]) * len(ex.get("choices", [0]))
            + sum(len(tok.encode(c)) for c in ex.get("choices", [ex.get("target")]))
            for ex in examples
        )


def test_gradient_requests_waiting_together_share_a_batch(tiny_hf_dir):
    from clova_train.inference.generate import GenerateConfig, load_model
    from clova_train.inference.scheduler import Job, Scheduler, Work
    from clova_train.studio.gradients import MAX_TOKENS, input_gradients, parse_request

    model, tok = load_model(tiny_hf_dir, device="cpu")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)

    def request(examples, k, **kw):
        body = {"vectors": (0.05 * torch.randn(k, model.cfg.n_embd, generator=gen)).tolist(), "examples": examples, **kw}
        return parse_request(body, width=model.cfg.n_embd, base=model.cfg.vocab_size, context=model.cfg.block_size, encode=tok.encode_batch)

    reqs = [request(EXAMPLES, 4), request(EXAMPLES[1:3], 4, score="mean"), request(EXAMPLES[:1], 4, grad=False), request([{"segments": ["국회는"], "target": " 법률"}], 0)]
    sched = Scheduler(model, tok, workers=0)  # the test takes and runs the batches itself
    works = [Work(input_gradients, r, args=(model,), size=r.tokens, capacity=MAX_TOKENS) for r in reqs]
    sched.submit(works[0])
    sched.submit(Job([tok.encode("국회는")], GenerateConfig(max_new_tokens=2, temperature=0)))
    for w in works[1:]:
        sched.submit(w)
    sched.submit(Work(input_gradients, reqs[0], args=(model,), size=MAX_TOKENS, capacity=MAX_TOKENS))  # no room left
    batch = sched._take()
    assert batch == works and sched.batched == len(works) - 1
    sched._run(batch)

    def flat(scores: list) -> list[float]:
        return [x for s in scores for x in (s if isinstance(s, list) else [s])]

    for req, work in zip(reqs, works):
        alone = input_gradients(model, [req])[0]
        got = work.future.result()
        assert got["loss"] == pytest.approx(alone["loss"], abs=1e-6)
        assert flat(got["scores"]) == pytest.approx(flat(alone["scores"]), abs=1e-5)
        if not req.grad:
            assert got["grad"] is None
        elif len(req.vectors):
            want = torch.tensor(alone["grad"])
            assert want.abs().max() > 0 and (torch.tensor(got["grad"]) - want).abs().max() <= 1e-5 * want.abs().max()
        else:
            assert got["grad"] == alone["grad"] == []
    assert sched.queued == 2  # the generation job and the request that did not fit


def _bad_cases(width: int) -> list:
    ok = {"segments": ["국회는", 0], "choices": [" 부정", " 긍정"], "gold": 0}
    vec = [[0.0] * width]
    return [
        ("wrong vector width", {"vectors": [[0.0] * (width - 1)], "examples": [ok]}, "wrong_vector_width", f"width (d_model) is {width}"),
        ("index out of range", {"vectors": vec, "examples": [{**ok, "segments": ["국회는", 1]}]}, "index_out_of_range", "has 1 vectors"),
        ("too many examples", {"vectors": vec, "examples": [ok] * 65}, "too_many_examples", "at most 64"),
        ("empty choices", {"vectors": vec, "examples": [{**ok, "choices": []}]}, "empty_choices", "non-empty list"),
        ("gold out of range", {"vectors": vec, "examples": [{**ok, "gold": 2}]}, "gold_out_of_range", "(0..1)"),
        ("non-finite number", {"vectors": [[math.nan] + [0.0] * (width - 1)], "examples": [ok]}, "non_finite", "finite"),
        ("infinite number", {"vectors": [[0.0] * (width - 1) + [math.inf]], "examples": [ok]}, "non_finite", "finite"),
        ("too many tokens", {"vectors": vec, "examples": [{**ok, "segments": ["대한민국 국민 " * 120, 0]}] * 64}, "too_many_tokens", "at most 16384"),
        ("context too long", {"vectors": vec, "examples": [{**ok, "segments": ["대한민국 국민 " * 600, 0]}]}, "context_length_exceeded", "context of 1024"),
        ("target and choices", {"vectors": vec, "examples": [{**ok, "target": "x"}]}, None, "either a target or choices"),
        ("unknown field", {"vectors": vec, "examples": [ok], "lr": 1}, "unknown_field", "'lr'"),
        ("input filter", {"vectors": vec, "examples": [{**ok, "segments": [0, "금지어가 있다"]}]}, "input_filtered", "금지어"),
    ]


def test_bad_gradient_requests_are_400s_with_the_reason(studio, tiny_hf_dir):
    width = json.loads((tiny_hf_dir / "config.json").read_text())["n_embd"]
    for name, body, code, fragment in _bad_cases(width):
        status, r = _post(studio["url"] + "/v1/ptune/gradients", json.dumps(body).encode())
        assert status == 400, (name, r)
        assert fragment in r["error"]["message"], (name, r)
        if code:
            assert r["error"]["code"] == code, (name, r)
    assert _post(studio["url"] + "/v1/ptune/gradients", {"vectors": [], "examples": EXAMPLES[1:2]}, key="sk-wrong")[0] == 401
    # The server serves on: a good request after the bad ones.
    status, r = _post(studio["url"] + "/v1/ptune/gradients", {"vectors": [], "examples": [{"segments": ["모든 국민은"], "choices": [" 부정", " 긍정"], "gold": 1}]})
    assert status == 200 and r["grad"] == [] and len(r["scores"][0]) == 2 and r["loss"] > 0
    assert _get(studio["url"] + "/health")[0] == 200


# ---------------------------------------------------------------- clova ptune --server


def test_ptune_with_server_gradients_matches_local_ptune(studio, tiny_hf_dir, separable, tmp_path):
    from typer.testing import CliRunner

    from clova_train.cli import app
    from clova_train.evaluation.evaluate import EvalConfig, evaluate
    from clova_train.evaluation.ptune import ptune
    from clova_train.inference.generate import load_model
    from clova_train.studio.remote import ptune_remote
    from safetensors.torch import load_file

    model, tok = load_model(tiny_hf_dir, device="cpu")
    # Settings under which this tiny model's accuracy moves from epoch to epoch (68.75% after the first).
    kw = dict(encoder="mlp", batch_size=4, lr=1e-2)
    # One epoch: the vectors themselves agree.
    local = ptune(model, tok, _cfg(separable, tmp_path / "local1", epochs=1, **kw), show_progress=False)
    remote = ptune_remote(studio["url"], KEY, _cfg(separable, tmp_path / "remote1", epochs=1, **kw), show_progress=False)
    mine, theirs = (load_file(str(tmp_path / d / VECTORS_FILE))["vectors"] for d in ("local1", "remote1"))
    assert mine.abs().max() > 1e-3  # trained away from the zero start
    assert (mine - theirs).abs().max() <= 1e-4
    assert remote["zero_shot"] == local["zero_shot"] and remote["history"][0]["valid"] == local["history"][0]["valid"]
    assert remote["history"][0]["train_loss"] == pytest.approx(local["history"][0]["train_loss"], abs=1e-5)

    # Several epochs through the command line: the same accuracy every epoch, and the prompt works with `clova eval`.
    local = ptune(model, tok, _cfg(separable, tmp_path / "local", epochs=3, **kw), show_progress=False)
    assert len({h["valid"]["accuracy"] for h in local["history"]} | {local["zero_shot"]["accuracy"]}) > 1
    args = ["--task", "nsmc", "--train", separable["train"], "--valid", separable["valid"], "--template", separable["template"],
            "--prompt-tokens", "4", "--hidden-size", "32", "--epochs", "3", "--lr", "1e-2", "--encoder", "mlp", "--batch-size", "4", "-q"]  # fmt: skip
    r = CliRunner().invoke(app, ["ptune", "--server", studio["url"], "--api-key", KEY, "--out", str(tmp_path / "remote"), *map(str, args)])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "remote" / META_FILE).read_text())
    assert [h["valid"] for h in meta["history"]] == [h["valid"] for h in local["history"]]
    assert meta["best"] == local["best"] and meta["base_model"]["server"] == studio["url"]
    tuned = evaluate(model, tok, EvalConfig(task="nsmc", data=str(separable["valid"]), ptune=str(tmp_path / "remote"), out=str(tmp_path / "r.json")), show_progress=False)
    assert tuned["metrics"] == local["best"]

    r = CliRunner().invoke(app, ["ptune", "--server", studio["url"], "--api-key", "sk-wrong", "--out", str(tmp_path / "x"), *map(str, args)])
    assert r.exit_code == 2 and "401" in r.output and "API key" in r.output
    r = CliRunner().invoke(app, ["ptune", "--task", "nsmc", "--train", "a", "--valid", "b", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "MODEL" in r.output and "--server" in r.output



# ---------------------------------------------------------------- no-code p-tuning jobs and presets


def test_jobs_need_a_state_dir(studio, tiny_hf_dir):
    from typer.testing import CliRunner

    from clova_train.cli import app

    r = CliRunner().invoke(app, ["serve", str(tiny_hf_dir), "--ptune-jobs", "2"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--state-dir" in r.output, r.output
    status, text = _get(studio["url"] + "/v1/ptune/jobs", KEY)
    for status, r in ((status, json.loads(text)), _post(studio["url"] + "/v1/presets", {"name": "x", "prompt": "y"})):
        assert status == 404 and r["error"]["code"] == "no_state_dir" and "--state-dir" in r["error"]["message"]


def _job_errors(url: str, state: Path, separable) -> None:
    """Bad jobs and presets are 400s naming the file line, the field or the setting; nothing is left behind."""
    train = separable["train"].read_text(encoding="utf-8")
    base = {"task": "nsmc", "train": train, "valid": train}
    cases = [
        ({**base, "train": train + "99\t좋은 영화\t7\n"}, f"the train file:{len(train.splitlines()) + 1}: unknown label '7'"),
        ({**base, "valid": "document\tlabel\n"}, "the valid file: columns are"),
        ({**base, "template": {"query": "{document}", "verbalizers": {"0": "a", "1": "b"}}}, "ptune_query"),
        ({**base, "template": {"query": "{review}", "ptune_query": "{prompt}{review}", "verbalizers": {"0": "a", "1": "b"}}}, "unknown field(s) review"),
        ({**base, "encoder": "gru"}, "encoder must be one of lstm, mlp"),
        ({**base, "epochs": 0}, "epochs"),
        ({**base, "task": "nli"}, "unknown task"),
    ]
    for body, fragment in cases:
        status, r = _post(url + "/v1/ptune/jobs", body)
        assert status == 400 and fragment in r["error"]["message"], (fragment, r)
    assert json.loads(_get(url + "/v1/ptune/jobs", KEY)[1])["data"] == [] and not any((state / "jobs").iterdir())
    for body, fragment in (
        ({"name": 3, "prompt": "x"}, "name: Input should be a valid string"),
        ({"name": "a", "prompt": "b", "seed": 1}, "unknown field 'seed'"),
        ({"name": " ", "prompt": "b"}, "a preset needs a name and a prompt"),
        ({"name": "a", "prompt": "b", "top_p": 0}, "0 < top_p <= 1"),
    ):
        status, r = _post(url + "/v1/presets", body)
        assert status == 400 and fragment in r["error"]["message"], (body, r)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium fonts-noto-cjk)")
def test_ptuning_job_in_the_playground_survives_a_restart(tiny_hf_dir, separable, tmp_path):
    from playwright.sync_api import sync_playwright

    from clova_train.evaluation.ptune import ptune
    from clova_train.inference.generate import GenerateConfig, generate_ids, load_model
    from clova_train.studio.codec import prompt_codec

    state = tmp_path / "state"
    proc, url = start_server([tiny_hf_dir, "--state-dir", state], tmp_path / "server.log")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]  # fmt: skip
    template = separable["template"].read_text(encoding="utf-8")
    text = "자유 권리 평등"
    try:
        _job_errors(url, state, separable)
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=flags, viewport={"width": 1200, "height": 900}
            )
            page = browser.new_page()
            page.goto(url + "/playground/ptune.html")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#task option').length >= 5")
            page.select_option("#task", "nsmc")
            assert "ptune_query" in page.input_value("#template")  # the shipped template, to edit
            page.fill("#job-name", "감정 분류")
            page.set_input_files("#train-file", str(separable["train"]))
            page.set_input_files("#valid-file", str(separable["valid"]))
            page.fill("#template", template)
            for field, value in (("prompt_tokens", "4"), ("hidden_size", "32"), ("epochs", "2"), ("lr", "0.01"), ("batch_size", "4")):
                page.fill(f"#{field}", value)
            page.select_option("#encoder", "mlp")
            page.click("#start")
            page.wait_for_function("document.getElementById('job-status').textContent.includes('queued')")
            page.wait_for_selector("#jobs tr[data-status=done]", timeout=120000)
            row = page.text_content("#jobs tr[data-status=done]")
            page.screenshot(path=str(tmp_path / "ptune.png"), full_page=True)
            jobs = json.loads(_get(url + "/v1/ptune/jobs", KEY)[1])["data"]
            assert len(jobs) == 1 and jobs[0]["status"] == "done" and [h["epoch"] for h in jobs[0]["history"]] == [1, 2]
            job = jobs[0]
            rows = {k: len(separable[k].read_text(encoding="utf-8").splitlines()) - 1 for k in ("train", "valid")}  # less the header
            assert job["name"] == "감정 분류" and job["examples"] == rows
            # As the page writes them (JavaScript's toFixed(2) rounds a half up; Python's format, to even).
            fixed = lambda x: str(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))  # noqa: E731
            assert all(f"{h['epoch']}: accuracy {fixed(h['valid']['accuracy'])}" in row for h in job["history"]), row

            # Use the trained prompt in the playground: the page links to it by model name.
            page.click(f"#jobs tr[data-job='{job['id']}'] a.use")
            page.wait_for_function("want => document.getElementById('model-select').value === want", arg=job["model"])
            shown = generate_in_playground(page, text, max_tokens=16, temperature=0.9, seed=4)
            page.fill("#preset-name", "내 프리셋")
            page.click("#save-preset")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('saved preset')")
            assert page.eval_on_selector("#preset", "s => s.options[s.selectedIndex].textContent") == "내 프리셋"
            browser.close()
    finally:
        stop_server(proc)

    # The job trained as `clova ptune` does with the same settings, on the uploaded template.
    model, tok = load_model(tiny_hf_dir, device="cpu")
    assert json.loads((state / "jobs" / job["id"] / "template.json").read_text())["ptune_query"] == json.loads(template)["ptune_query"]
    local = ptune(model, tok, _cfg(separable, tmp_path / "local", epochs=2, encoder="mlp", batch_size=4, lr=1e-2), show_progress=False)
    assert [h["valid"] for h in job["history"]] == [h["valid"] for h in local["history"]] and job["best"] == local["best"]
    assert job["history"][0]["train_loss"] == pytest.approx(local["history"][0]["train_loss"], abs=1e-5)
    embed, encode = prompt_codec(model, tok, state / "jobs" / job["id"] / "prompt")
    want = generate_ids(model, tok, encode([text]), GenerateConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=4), embed=embed)[0].text
    plain = generate_ids(model, tok, [tok.encode(text)], GenerateConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=4))[0].text
    assert shown == want and want != plain and HANGUL.search(want)

    # After a restart the job, its prompt and the preset are still there, and the prompt still serves.
    proc, url = start_server([tiny_hf_dir, "--state-dir", state], tmp_path / "server2.log")
    try:
        jobs = json.loads(_get(url + "/v1/ptune/jobs", KEY)[1])["data"]
        assert [(j["id"], j["status"], j["history"]) for j in jobs] == [(job["id"], "done", job["history"])]
        assert job["model"] in [m["id"] for m in json.loads(_get(url + "/v1/models", KEY)[1])["data"]]
        presets = json.loads(_get(url + "/v1/presets", KEY)[1])["data"]
        mine = [p for p in presets if p["name"] == "내 프리셋"]
        assert len(mine) == 1 and mine[0]["prompt"] == text and mine[0]["max_tokens"] == 16 and mine[0]["temperature"] == 0.9
        assert {"character_bot", "intent_utterances", "event_title"} <= {p["id"] for p in presets}
        status, r = _post(url + "/v1/completions", {"model": job["model"], "prompt": text, "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 4})
        assert status == 200 and r["choices"][0]["text"] == want
        assert _post(url + "/v1/completions", {"model": f"{MODEL}/ptune/nope", "prompt": text})[0] == 404
    finally:
        stop_server(proc)


def test_state_dir_has_one_server_and_a_stopped_job_says_so(tiny_lm, tmp_path, caplog):
    from clova_train.core.errors import ClovaError
    from clova_train.studio.jobs import Studio

    model, tok = tiny_lm
    state = tmp_path / "state"
    first = Studio(state, model, tok, MODEL, [])
    job = first.create({"task": "nsmc", "train": "id\tdocument\tlabel\n1\t좋다\t1\n", "valid": "id\tdocument\tlabel\n2\t싫다\t0\n", "epochs": 1, "prompt_tokens": 2, "hidden_size": 8, "encoder": "mlp"})
    with pytest.raises(ClovaError, match="clova serve --state-dir"):
        Studio(state, model, tok, MODEL, [])
    first.close()
    first._threads[0].join(60)  # the queued job ran (or failed with its reason) before the sentinel
    # As if the server had stopped mid-job: the record says running; a second record is unreadable.
    record = json.loads((state / "jobs" / job["id"] / "job.json").read_text())
    (state / "jobs" / job["id"] / "job.json").write_text(json.dumps({**record, "status": "running"}))
    (state / "jobs" / "broken").mkdir()
    (state / "jobs" / "broken" / "job.json").write_text("{not json")
    again = Studio(state, model, tok, "other-name", [])
    try:
        (reloaded,) = again.list()
        assert reloaded["status"] == "failed" and "stopped while this job ran" in reloaded["error"]
        assert reloaded["model"] == f"other-name/ptune/{job['id']}" and again.resolve(reloaded["model"]) is None
        assert "broken/job.json: skipped" in caplog.text
    finally:
        again.close()


def test_a_job_thread_tokenizes_with_caches_of_its_own(tiny_lm):
    """The server tokenizes requests on its one preparation thread; a p-tuning job thread gets a twin of the
    tokenizer (the same ids) whose caches the server's thread never clears under it."""
    _, tok = tiny_lm
    twin = tok.for_thread()
    text = "대한민국의 국회는 법률을 제정한다"
    assert twin.encode(text) == tok.encode(text)
    tok._cache.clear()  # what the server's thread does when its cache is full
    tok._morph_cache.clear()
    assert twin._cache and twin._morph_cache and twin.encode(text) == tok.encode(text)
