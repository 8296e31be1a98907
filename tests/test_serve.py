"""`clova serve` as a real subprocess on a tiny export: the official openai client, filters, concurrency, errors, the playground in Chromium."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from clova_train.inference.api import Message, chat_prompt
from clova_train.inference.generate import GenerateConfig, generate_ids

from conftest import KEY, _get, _metric, _post, reference, start_server, stop_server

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MODEL = "tiny-ko"
PROMPTS = ["대한민국은 민주공화국이다.", "국회는", "모든 국민은", "제1조", "대통령은", "법률은", "국가는", "헌법"]
HANGUL = re.compile(r"[\uac00-\ud7a3]")
CHROMIUM = "/usr/bin/chromium"


# ---------------------------------------------------------------- the API through the official client


def test_models_completion_chat_and_streaming(client, local, banned):
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0.8, seed=5)
    assert r.choices[0].text == reference(local, PROMPTS[0], [banned], max_new_tokens=30, temperature=0.8, seed=5)[0]
    assert HANGUL.search(r.choices[0].text) and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(local[1].encode(PROMPTS[0])) and r.usage.completion_tokens > 0

    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0.8, seed=5, stream=True)
    chunks = list(streamed)
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    echo = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(PROMPTS[1]) and len(echo.choices[0].text) > len(PROMPTS[1])

    # Chat: the documented plain template, completed by the same generation.
    messages = [{"role": "system", "content": "헌법을 설명한다."}, {"role": "user", "content": "국회는 무엇을 하나요?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.8, seed=2)
    text, stops = chat_prompt([Message(**m) for m in messages])
    assert text == "헌법을 설명한다.\n\n사용자: 국회는 무엇을 하나요?\nAI:"
    want = reference(local, text, [banned], max_new_tokens=24, temperature=0.8, seed=2, stop=stops)[0].lstrip()
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert HANGUL.search(want)
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.8, seed=2, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want


def test_seed_reproduces_and_matches_in_process_generation(client, local, banned):
    kw = dict(prompt=PROMPTS[2], max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, n=2)
    one = client.completions.create(model=MODEL, **{k: v for k, v in kw.items() if k != "top_k"}, seed=7, extra_body={"top_k": 50})
    two = client.completions.create(model=MODEL, **{k: v for k, v in kw.items() if k != "top_k"}, seed=7, extra_body={"top_k": 50})
    other = client.completions.create(model=MODEL, **{k: v for k, v in kw.items() if k != "top_k"}, seed=8, extra_body={"top_k": 50})
    texts = [c.text for c in one.choices]
    assert texts == [c.text for c in two.choices]
    assert texts != [c.text for c in other.choices]
    assert texts == reference(local, PROMPTS[2], [banned], max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=7, n=2)
    streamed = client.completions.create(model=MODEL, **{k: v for k, v in kw.items() if k != "top_k"}, seed=7, stream=True, extra_body={"top_k": 50})
    by_choice = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            by_choice[c.index] += c.text
    assert by_choice == texts


def reference_logprobs(local, prompt: str, banned: list[str], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ids for ``prompt`` generated alone in process, and the model's log-probability of each."""
    model, tok = local
    ids = tok.encode(prompt)
    sampled = generate_ids(model, tok, [ids], GenerateConfig(max_new_tokens=max_tokens, temperature=0, banned_words=banned))[0].token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids + sampled]))[0, :, : tok.vocab_size].log_softmax(-1)
    return sampled, [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(sampled)]


def test_logprobs_are_the_models_own(client, local, banned):
    tok = local[1]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    sampled, want = reference_logprobs(local, PROMPTS[3], [banned], 12)
    assert lp.tokens == [tok.token_bytes(t).decode("utf-8", "replace") for t in sampled]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_logit_bias_steers_sampling_as_in_process(client, local, banned):
    tok = local[1]
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, logprobs=0)
    first = tok.encode(greedy.choices[0].text)[0]
    # -100 all but bans the greedy first token; +100 on another token makes it every token.
    for bias in ({first: -100}, {tok.encode("국회")[0]: 100}):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, logit_bias={str(k): v for k, v in bias.items()})
        want = reference(local, PROMPTS[4], [banned], max_new_tokens=6, temperature=0, logit_bias=bias)[0]
        assert r.choices[0].text == want and want != greedy.choices[0].text
    got, data = _post(server_url(client) + "/completions", {"prompt": "국회는", "logit_bias": {"abc": 1}})
    assert got == 400 and data["error"]["param"] == "logit_bias"


def server_url(client) -> str:
    return str(client.base_url).rstrip("/")


def test_best_of_returns_the_likeliest_of_its_samples(client):
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=12, temperature=1.0, seed=11)
    all4 = client.completions.create(**kw, n=4, logprobs=0).choices
    score = {c.text: sum(lp for lp in c.logprobs.token_logprobs if lp is not None) for c in all4}
    assert len(score) > 1, "the four samples should differ"
    best = client.completions.create(**kw, n=1, extra_body={"best_of": 4}).choices
    assert [c.text for c in best] == [max(score, key=score.get)] and best[0].logprobs is None
    two = client.completions.create(**kw, n=2, extra_body={"best_of": 4}).choices
    assert [c.text for c in two] == sorted(score, key=score.get, reverse=True)[:2]
    got, data = _post(server_url(client) + "/completions", {"prompt": "국회는", "n": 2, "best_of": 1})
    assert got == 400 and data["error"]["param"] == "best_of"


def test_tokenize_spells_partial_characters_as_bytes(server):
    got, data = _post(server["url"] + "/v1/tokenize", {"text": "국회는 뷁"})  # a syllable the tiny tokenizer never merged
    assert got == 200, data
    shown = [t for m in data["morphemes"] for t in m["tokens"]]
    assert "\ufffd" not in "".join(shown) and any(re.fullmatch(r"(\\x[89a-f][0-9a-f])+", t) for t in shown), shown


def test_every_request_is_logged_on_one_line(client, server):
    client.completions.create(model=MODEL, prompt="국회는", max_tokens=2, temperature=0)
    _get(server["url"] + "/v1/nothing-here", KEY)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server["log"].read_text()
        if '"GET /v1/nothing-here" 404' in log:
            break
        time.sleep(0.1)
    assert re.search(r'^\S+ \S+ 127\.0\.0\.1 "POST /v1/completions" 200 \d+\.\d{3}s$', log, re.M), log
    assert re.search(r'127\.0\.0\.1 "GET /v1/nothing-here" 404 \d+\.\d{3}s$', log, re.M), log


# ---------------------------------------------------------------- filters


def test_input_filter_rejects_with_the_reason(client, server):
    import openai

    before = _metric(server, 'clova_filter_rejections_total{reason="banned_word"}')
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="이 문장에는 금지어가 있다", max_tokens=5)
    assert e.value.status_code == 400 and "금지어" in str(e.value) and e.value.code == "input_filtered"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "제 번호는 900101-1234567 입니다"}], max_tokens=5)
    assert "pattern" in str(e.value) and e.value.param == "messages.0.content"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="국회는", max_tokens=1001)
    assert e.value.code == "max_tokens_too_large"
    assert _metric(server, 'clova_filter_rejections_total{reason="banned_word"}') == before + 1
    assert _metric(server, 'clova_filter_rejections_total{reason="banned_pattern"}') >= 1

    # The file is re-read when it changes: a new banned word applies to the next request.
    original = server["filters"].read_text(encoding="utf-8")
    cfg = json.loads(original)
    reload_errors = _metric(server, "clova_filter_reload_errors")
    try:
        server["filters"].write_text(json.dumps({**cfg, "input_banned_words": ["금지어", "새금지"]}), encoding="utf-8")
        with pytest.raises(openai.BadRequestError, match="새금지"):
            client.completions.create(model=MODEL, prompt="새금지 단어", max_tokens=5)
        server["filters"].write_text("{not json", encoding="utf-8")  # a broken edit keeps the filters in force
        with pytest.raises(openai.BadRequestError, match="새금지"):
            client.completions.create(model=MODEL, prompt="새금지 단어", max_tokens=5)
        assert _metric(server, "clova_filter_reload_errors") == reload_errors + 1
    finally:
        server["filters"].write_text(original, encoding="utf-8")
    assert client.completions.create(model=MODEL, prompt="새금지 단어", max_tokens=3).choices[0].text is not None


def test_banned_output_words_are_never_emitted(client, local, banned):
    unfiltered = filtered = 0
    for seed in range(6):
        kw = dict(max_new_tokens=40, temperature=1.0, seed=seed)
        unfiltered += sum(banned in t for t in reference(local, "대한민국", [], **kw))
        texts = [c.text for c in client.completions.create(model=MODEL, prompt="대한민국", max_tokens=40, temperature=1.0, seed=seed).choices]
        filtered += sum(banned in t for t in texts)
        assert texts == reference(local, "대한민국", [banned], **kw)
    assert unfiltered >= 1 and filtered == 0


# ---------------------------------------------------------------- concurrency


def test_eight_concurrent_clients_get_what_they_would_get_alone(client, local, banned):
    # Half greedy (the server batches them together; this tiny model's greedy text is mostly
    # newlines, so their log-probabilities tell them apart), half sampled with their own seeds.
    jobs = [dict(prompt=p, max_tokens=24, temperature=0.8, seed=i) if i % 2 else dict(prompt=p, max_tokens=24, temperature=0, logprobs=0)
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    want = [
        reference_logprobs(local, j["prompt"], [banned], 24)[1] if "logprobs" in j
        else reference(local, j["prompt"], [banned], max_new_tokens=24, temperature=0.8, seed=j["seed"])[0]
        for j in jobs
    ]  # fmt: skip
    got: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        c = client.completions.create(model=MODEL, **jobs[i]).choices[0]
        got[i] = c.logprobs.token_logprobs if "logprobs" in jobs[i] else c.text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == (pytest.approx(w, abs=1e-4) if "logprobs" in jobs[i] else w), jobs[i]
    assert len({tuple(round(v, 3) for v in w) if isinstance(w, list) else w for w in want}) == len(jobs)


def test_a_client_leaving_mid_stream_frees_its_slot(client, server):
    before = _metric(server, "clova_cancelled_requests")
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1000, temperature=1.0, seed=1, n=16, stream=True)
    next(iter(stream))
    stream.response.close()
    for _ in range(200):
        if _metric(server, "clova_cancelled_requests") > before:
            break
        time.sleep(0.05)
    assert _metric(server, "clova_cancelled_requests") == before + 1
    # Both workers are free again: two requests at once complete.
    out = []
    threads = [threading.Thread(target=lambda: out.append(client.completions.create(model=MODEL, prompt="국회는", max_tokens=4, temperature=0))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and json.loads(_get(server["url"] + "/health")[1])["busy"] == 0


# ---------------------------------------------------------------- bad requests


BAD = [
    ("bad json", "/v1/completions", b"{not json", KEY, 400, "invalid_json"),
    ("not an object", "/v1/completions", [1, 2], KEY, 400, None),
    ("unknown field", "/v1/completions", {"prompt": "국회는", "max_token": 5}, KEY, 400, "unknown_field"),
    ("negative max_tokens", "/v1/completions", {"prompt": "국회는", "max_tokens": -1}, KEY, 400, None),
    ("max_tokens past the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "안녕"}], "max_tokens": 100000}, KEY, 400, "max_tokens_too_large"),
    ("prompt longer than the context", "/v1/completions", {"prompt": "대한민국 국민 " * 1024, "max_tokens": 5}, KEY, 400, "context_length_exceeded"),
    ("prompt and max_tokens past the context", "/v1/completions", {"prompt": "대한민국 국민 " * 20, "max_tokens": 1000}, KEY, 400, "context_length_exceeded"),
    ("wrong key", "/v1/completions", {"prompt": "국회는"}, "sk-wrong", 401, "invalid_api_key"),
    ("no key", "/v1/models", None, None, 401, "invalid_api_key"),
    ("unknown model", "/v1/completions", {"prompt": "국회는", "model": "gpt-4"}, KEY, 404, "model_not_found"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, KEY, 400, None),
    ("token id out of range", "/v1/completions", {"prompt": [10**7]}, KEY, 400, None),
    ("unknown path", "/v1/engines", None, KEY, 404, "not_found"),
    ("too many completions", "/v1/completions", {"prompt": ["국회는"] * 8, "n": 9}, KEY, 400, None),
    ("too many stop sequences", "/v1/completions", {"prompt": "국회는", "stop": ["다"] * 17}, KEY, 400, None),
    ("prompt past the default max_prompt_chars", "/v1/completions", {"prompt": "a" * 100_001}, KEY, 400, "prompt_too_long"),
    # Issue 22, point 8: a lone surrogate (legal as a JSON escape, not text) was a 500.
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', KEY, 400, "invalid_text"),
    ("lone surrogate in a prompt list", "/v1/completions", b'{"prompt": ["ok", "a\\udfffb"]}', KEY, 400, "invalid_text"),
    ("lone surrogate in a chat message", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', KEY, 400, "invalid_text"),
    ("lone surrogate in a stop sequence", "/v1/completions", b'{"prompt": "ok", "stop": ["\\udc00"]}', KEY, 400, "invalid_text"),
    ("lone surrogate to tokenize", "/v1/tokenize", b'{"text": "\\ud800"}', KEY, 400, "invalid_text"),
    # Point 10: 100k nested arrays were a 500 (Python's parser recursion), /metrics answered without the key.
    ("100k nested arrays", "/v1/completions", b"[" * 100_000, KEY, 400, "invalid_json"),
    ("100k nested arrays in a field", "/v1/completions", b'{"prompt": ' + b"[" * 100_000, KEY, 400, "invalid_json"),
    ("metrics without the key", "/metrics", None, None, 401, "invalid_api_key"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_serves_on(server, case):
    _, path, body, key, status, code = case
    if body is None:
        got, text = _get(server["url"] + path, key)
        data = json.loads(text)
    else:
        got, data = _post(server["url"] + path, body, key)
    assert got == status, data
    assert set(data) == {"error"} and data["error"]["message"] and data["error"]["type"]
    if code:
        assert data["error"]["code"] == code, data
    assert _get(server["url"] + "/health")[0] == 200


def test_a_body_too_large_is_refused_before_it_is_read(server):
    import http.client

    host, port = server["url"].rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"), ("Content-Length", str(9 << 20))):
        conn.putheader(k, v)
    conn.endheaders()  # the body never comes: the answer must not wait for it
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()
    assert _get(server["url"] + "/health")[0] == 200


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="국회는", max_tokens=2, temperature=0)
    text = _get(server["url"] + "/metrics", KEY)[1]
    assert '# TYPE clova_requests_total counter' in text and "# TYPE clova_request_seconds histogram" in text
    assert re.search(r'^clova_requests_total\{code="200",endpoint="/v1/completions"\} [1-9]', text, re.M)
    assert re.search(r'^clova_request_seconds_count\{endpoint="/v1/completions"\} [1-9]', text, re.M)
    assert _metric(server, "clova_generated_tokens_total") > 0


# ---------------------------------------------------------------- the playground in a real browser


def generate_in_playground(page, prompt: str, *, max_tokens: int, temperature: float, seed: int) -> str:
    """Type a prompt and its settings into the open playground, generate, and return the completion it shows."""
    page.fill("#prompt", prompt)
    page.dispatch_event("#prompt", "input")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#seed", str(seed))
    page.fill("#stop-strings", "")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('finish:')", timeout=60000)
    return page.text_content("#completion")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium fonts-noto-cjk)")
def test_playground_in_headless_chromium(server, client, local, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    prompt = "대한민국의 국회는"
    want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.8, top_p=0.9, seed=3).choices[0].text
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=flags, viewport={"width": 1200, "height": 900}
        )
        page = browser.new_page()
        page.goto(server["url"] + "/")
        # The server wants a key: the page asks for it beside the field, with no error before the user did anything.
        page.wait_for_function("document.getElementById('key-hint').textContent !== ''")
        assert "--api-key" in page.text_content("#key-hint") and "needs-key" in page.get_attribute("#api-key", "class")
        assert page.text_content("#status") == "" and page.text_content("#model") == ""
        page.fill("#api-key", "sk-wrong")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('key-hint').textContent.includes('not accepted')")
        assert page.text_content("#status") == ""
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#preset option').length >= 4")
        assert page.text_content("#key-hint") == "" and MODEL in page.text_content("#model")
        assert "needs-key" not in page.get_attribute("#api-key", "class")
        names = page.eval_on_selector_all("#preset option", "os => os.map(o => o.value)")
        assert {"character_bot", "intent_utterances", "event_title"} <= set(names)
        page.select_option("#preset", "character_bot")
        assert "한결" in page.input_value("#prompt")
        shown = generate_in_playground(page, prompt, max_tokens=20, temperature=0.8, seed=3)
        pieces = [p.replace(" ", "\u2423") for p in local[1].segment(prompt)]  # spaces shown as ␣
        assert any(p.startswith("\u2423") for p in pieces)
        page.wait_for_function(
            "want => JSON.stringify([...document.querySelectorAll('#tokens tbody tr td:first-child')].map(t => t.textContent)) === want",
            arg=json.dumps(pieces, ensure_ascii=False, separators=(",", ":")),
        )
        ids = page.eval_on_selector_all("#tokens tbody tr td.ids", "tds => tds.map(t => t.textContent)")
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    with capsys.disabled():
        print(f"\nplayground screenshot: {shot}")
    assert shown == want and HANGUL.search(shown)
    assert [int(i) for row in ids for i in row.split()] == local[1].encode(prompt)
    assert shot.stat().st_size > 10_000


# ---------------------------------------------------------------- start-up errors and p-tuned prompts


def test_start_up_errors_are_one_line(tiny_hf_dir, server, tmp_path):
    from typer.testing import CliRunner

    from clova_train.cli import app

    bad = tmp_path / "filters.json"
    bad.write_text('{"input_banned_words": ["x"], "output_banned": ["y"]}', encoding="utf-8")
    # A pattern RE2 cannot run in linear time (a backreference) is refused at load, named.
    backtracking = tmp_path / "backref.json"
    backtracking.write_text(json.dumps({"input_banned_patterns": [r"\d+", r"(\w+)-\1"]}), encoding="utf-8")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "mine.json").write_text('{"name": "mine"}', encoding="utf-8")
    port = server["url"].rsplit(":", 1)[1]
    cases = [
        (["--filters", bad], [str(bad), "output_banned"]),
        (["--filters", backtracking], [str(backtracking), r"'(\\w+)-\\1'", "RE2"]),
        (["--filters", tmp_path / "missing.json"], ["missing.json", "not found"]),
        (["--presets", presets], ["mine.json", "prompt"]),
        (["--port", port], [f"127.0.0.1:{port}", "--port"]),
    ]
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    # A busy port is named before the model loads: here no model would load at all.
    r = CliRunner().invoke(app, ["serve", str(not_a_model), "--device", "cpu", "--port", port])
    assert r.exit_code == 2 and r.output.startswith("error: cannot listen on") and len(r.output.strip().splitlines()) == 1, r.output
    for args, fragments in cases:
        r = CliRunner().invoke(app, ["serve", str(tiny_hf_dir), "--device", "cpu", "--port", "0", *map(str, args)])
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and all(f in lines[0] for f in fragments), r.output


def test_serving_a_ptuned_prompt(tiny_lm, tiny_hf_dir, local, tmp_path):
    from clova_train.cli.serve import _ptuned
    from clova_train.evaluation.ptune import PTuneConfig, ptune

    rows = ["id\tdocument\tlabel"] + [f"{i}\t{'자유 권리' if i % 2 else '국회 정부'}\t{i % 2}" for i in range(8)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    template = {"query": "{document}\n답:", "verbalizers": {"0": "법률", "1": "국민"}, "ptune_query": "{prompt}{document}{prompt}"}
    (tmp_path / "template.json").write_text(json.dumps(template, ensure_ascii=False), encoding="utf-8")
    cfg = PTuneConfig(
        task="nsmc", train=str(tmp_path / "train.tsv"), valid=str(tmp_path / "train.tsv"), out=str(tmp_path / "p"),
        template=str(tmp_path / "template.json"), prompt_tokens=4, hidden_size=16, epochs=1,
    )  # fmt: skip
    ptune(tiny_lm[0], tiny_lm[1], cfg, show_progress=False)

    model, tok = local
    embed, encode = _ptuned(model, tok, tmp_path / "p")
    text = "자유 권리 평등"
    ids = encode([text])[0]
    assert ids == [model.cfg.vocab_size, model.cfg.vocab_size + 1, *tok.encode(text), model.cfg.vocab_size + 2, model.cfg.vocab_size + 3]
    want = generate_ids(model, tok, [ids], GenerateConfig(max_new_tokens=16, temperature=0.9, seed=4), embed=embed)[0]
    # The trained vectors change what the model predicts, against zero vectors in the same places
    # (a tiny model's sampled text may still coincide).
    from clova_train.evaluation.prompts import prompt_embedder

    zeros = prompt_embedder(model, torch.zeros(4, model.cfg.n_embd))
    with torch.no_grad():
        trained = model(None, inputs_embeds=embed(torch.tensor([ids])))[0, -1]
        untrained = model(None, inputs_embeds=zeros(torch.tensor([ids])))[0, -1]
    assert (trained - untrained).abs().max() > 1e-4

    proc, url = start_server([tiny_hf_dir, "--ptune", tmp_path / "p", "--public-metrics"], tmp_path / "server.log")
    try:
        status, r = _post(url + "/v1/completions", {"prompt": text, "max_tokens": 16, "temperature": 0.9, "seed": 4})
        metrics = _get(url + "/metrics")  # no key: this server was started with --public-metrics
    finally:
        stop_server(proc)
    assert status == 200, r
    assert metrics[0] == 200 and "clova_requests_total" in metrics[1]
    assert r["choices"][0]["text"] == want.text and r["usage"]["prompt_tokens"] == len(ids)


# ---------------------------------------------------------------- the pieces, in process


def test_scheduler_batches_equal_greedy_jobs_and_keeps_the_rest_apart(tiny_lm):
    from clova_train.inference.scheduler import Job, Scheduler

    model, tok = tiny_lm
    sched = Scheduler(model, tok, workers=0)  # no threads: the test takes and runs batches itself
    greedy = GenerateConfig(max_new_tokens=12, temperature=0)
    jobs = [
        Job([tok.encode(PROMPTS[0])], greedy),
        Job([tok.encode(PROMPTS[1])], GenerateConfig(max_new_tokens=12, temperature=0.8, seed=3)),
        Job([tok.encode(PROMPTS[2])], greedy, logprobs=0),
        Job([tok.encode(PROMPTS[3])], GenerateConfig(max_new_tokens=13, temperature=0)),
        Job([tok.encode(PROMPTS[4])], greedy, on_text=lambda i, t: None),
        Job([tok.encode(PROMPTS[5])] * 2, greedy),
    ]
    for job in jobs:
        sched.submit(job)
    batches = []
    while sched.queued:
        batch = sched._take()
        batches.append([jobs.index(j) for j in batch])
        sched._run(batch)
    assert batches == [[0, 2, 5], [1], [3], [4]] and sched.batched == 2 and sched.busy == 0
    for job in jobs:
        alone = generate_ids(model, tok, job.prompts, dataclasses.replace(job.cfg, batch_size=len(job.prompts)))
        assert [c.token_ids for c in job.future.result().completions] == [c.token_ids for c in alone]
    assert jobs[2].future.result().tokens is not None and jobs[0].future.result().tokens is None


def test_filter_file_and_chat_template_checks():
    from clova_train.core.errors import ClovaError
    from clova_train.inference.filters import FilterConfig

    from clova_train.text.readers import clean

    cfg = FilterConfig(input_banned_words=["Spam"], input_banned_patterns=[r"\d{3}-\d{4}-\d{4}", "(a+)+b"], max_prompt_chars=40)
    assert cfg.check_input("no SPAM here")[0] == "banned_word"
    assert cfg.check_input("전화 010-1234-5678")[0] == "banned_pattern"
    assert cfg.check_input("가" * 41)[0] == "prompt_chars"
    assert cfg.check_input("괜찮은 문장") is None and cfg.check_input("a" * 39) is None
    # Matched on what the tokenizer's cleaning leaves: control characters cannot split a word or a number.
    assert cfg.check_input("S\x01pam") is None and cfg.check_input("S\x01pam", clean)[0] == "banned_word"
    assert cfg.check_input("010-1234-\x1f5678", clean)[0] == "banned_pattern"
    assert FilterConfig().max_prompt_chars == 100_000
    for bad in (dict(input_banned_patterns=["("]), dict(output_banned_words=[""]), dict(max_tokens=-1)):
        with pytest.raises(ClovaError):
            FilterConfig(**bad)
    for pattern in (r"(a)\1", r"x(?=y)", r"(?<!x)y"):
        with pytest.raises(ClovaError, match=re.escape(repr(pattern)) + ".*RE2"):
            FilterConfig(input_banned_patterns=[pattern])
    text, stops = chat_prompt([
        Message(role="system", content="한결은 조선의 선비다."),
        Message(role="user", content="안녕하세요"),
        Message(role="assistant", name="한결", content="반갑소."),
        Message(role="user", content=[{"type": "text", "text": "무슨 책을 "}, {"type": "text", "text": "읽으세요?"}]),
    ])  # fmt: skip
    assert text == "한결은 조선의 선비다.\n\n사용자: 안녕하세요\n한결: 반갑소.\n사용자: 무슨 책을 읽으세요?\n한결:"
    assert set(stops) == {"\n사용자:", "\nAI:", "\n한결:"}
