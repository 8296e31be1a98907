"""Issue 22's attacks on `clova serve`, each through the real server test_serve.py also uses (conftest's
`server`, a child process with filters and two workers): what the filters see, pattern time, big requests
and /health, the output filter at the prompt's end and echo, near-zero sampling values, a dropped client.
Bad text (lone surrogates), deep nesting and /metrics without the key are rows of test_serve.py's BAD table.
Every test ends with the server still answering /health."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import KEY, _get, _metric, _post, reference

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _assert_healthy(server) -> None:
    assert _get(server["url"] + "/health")[0] == 200


@contextmanager
def _filters(server, **changes):
    """The server's filters file with ``changes`` while the block runs (the server reloads it), restored after."""
    path = server["filters"]
    original = path.read_text(encoding="utf-8")
    path.write_text(json.dumps({**json.loads(original), **changes}, ensure_ascii=False), encoding="utf-8")
    try:
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def test_filters_match_the_text_the_model_reads(server):
    # Point 1: the tokenizer drops control characters, so "금\x01지어" passed a ban on 금지어 and reached the
    # model as 금지어 (the same ids), and "900101-\x1f1234567" passed the resident-number pattern.
    url = server["url"]

    def ids(text: str) -> list[int]:
        return [i for row in _post(url + "/v1/tokenize", {"text": text})[1]["morphemes"] for i in row["ids"]]

    assert ids("금\u0001지어") == ids("금지어")
    cases = [
        ("/v1/completions", {"prompt": "이 문장에는 금\u0001지어가 있다", "max_tokens": 2}, "prompt", "banned word"),
        ("/v1/completions", {"prompt": ["괜찮다", "금지\u007f어"], "max_tokens": 2}, "prompt", "banned word"),
        ("/v1/completions", {"prompt": "번호 900101-\u001f1234567", "max_tokens": 2}, "prompt", "banned pattern"),
        ("/v1/completions", {"prompt": ids("금지어"), "max_tokens": 2}, "prompt", "banned word"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "금\u0001지어"}], "max_tokens": 2}, "messages.0.content", "banned word"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "규칙"}, {"role": "user", "content": "900101-\u00851234567"}]},
         "messages.1.content", "banned pattern"),
    ]  # fmt: skip
    for path, body, param, reason in cases:
        status, r = _post(url + path, body)
        assert status == 400 and r["error"]["code"] == "input_filtered" and r["error"]["param"] == param, (body, r)
        assert reason in r["error"]["message"]
    assert _post(url + "/v1/completions", {"prompt": "금\u0001요일", "max_tokens": 2})[0] == 200
    _assert_healthy(server)


def test_filter_patterns_run_in_linear_time(server):
    # Point 2: Python's backtracking engine took 26.8 s for "(a+)+b" on 27 characters, doubling with each one,
    # while /health waited. RE2 matches in time linear in the text.
    url = server["url"]
    patterns = [r"\d{6}-\d{7}", "(a+)+b"]
    with _filters(server, input_banned_patterns=patterns):
        status, r = _post(url + "/v1/completions", {"prompt": "a" * 40, "max_tokens": 1})
        assert status == 200, r
        # Filtered as quickly, then refused for the model's context (one token per "a"), not for the pattern.
        status, r = _post(url + "/v1/completions", {"prompt": "a" * 20_000, "max_tokens": 1})
        assert status == 400 and r["error"]["code"] == "context_length_exceeded", r
        status, r = _post(url + "/v1/completions", {"prompt": "a" * 40 + "b", "max_tokens": 1})
        assert status == 400 and "(a+)+b" in r["error"]["message"]
        status, r = _post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 500}], "max_tokens": 1})
        assert status == 200, r
        # A pattern RE2 cannot run (a backreference) is refused: an edit keeps the filters in force, counted.
        errors = _metric(server, "clova_filter_reload_errors")
        server["filters"].write_text(json.dumps({"input_banned_patterns": [r"(\w)\1"]}), encoding="utf-8")
        status, r = _post(url + "/v1/completions", {"prompt": "a" * 40 + "b", "max_tokens": 1})
        assert status == 400 and "(a+)+b" in r["error"]["message"]
        assert _metric(server, "clova_filter_reload_errors") == errors + 1
    _assert_healthy(server)


def test_health_answers_while_big_requests_are_prepared(server, local):
    # Point 3: 1.6 M token ids in one body held /health for 32 s and 1 M characters to /v1/tokenize for 12 s:
    # decoding, filtering and tokenizing ran in the event loop, and the completion count was checked after them.
    url = server["url"]
    vocab = local[1].vocab_size
    ids = [[(p * 7919 + j * 104729) % vocab for j in range(1000)] for p in range(65)]
    requests = [
        ("/v1/completions", {"prompt": ids, "max_tokens": 1}, 400, "more than 64 completions"),
        ("/v1/completions", {"prompt": [ids[0][:500]] * 8, "n": 9, "max_tokens": 1}, 400, "more than 64 completions"),
        ("/v1/tokenize", {"text": "a" * 1_000_000}, 400, "at most 100000"),
        ("/v1/completions", {"prompt": "국민 " * 300_000, "max_tokens": 1}, 413, "larger than"),
        ("/v1/completions", {"prompt": ["대한민국 국민은 " * 150] * 64, "max_tokens": 1}, 200, None),
        ("/v1/tokenize", {"text": "대한민국 국민은 " * 11_000}, 200, None),
    ]
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            status = _get(url + "/health")[0]
            answers.append((status, time.perf_counter() - t0))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for path, body, status, fragment in requests:
            data = json.dumps(body, ensure_ascii=False).encode()
            got, r = _post(url + path, data) if status != 413 else _post_unread(url + path, data)
            assert got == status, (path, r)
            assert fragment is None or fragment in r["error"]["message"], r
    finally:
        stop.set()
        poller.join()
    assert answers and all(status == 200 for status, _ in answers)
    # A generous bound (the point is "answers", not a speed): before, the same requests held it for seconds.
    assert max(seconds for _, seconds in answers) < 5, sorted(answers)[-3:]


def _post_unread(url: str, data: bytes) -> tuple[int, dict]:
    """POST a body the server refuses by its length alone: send the headers, read the answer, never the body."""
    host, port = url.split("/")[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/" + url.split("/", 3)[3])
        for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"), ("Content-Length", str(len(data)))):
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_output_filter_spans_the_prompt_end_and_echo_keeps_it(server, local, banned):
    # Point 4: the output filter looked at the completion alone, so a banned word could start in the prompt and
    # end in the completion; and echo returned an output-banned word standing in the prompt.
    url = server["url"]
    prompt = "법률로 정하여야 한"
    # The banned word: the prompt's last syllable and the first letter the model writes after it (for some seed).
    kw = dict(max_new_tokens=4, temperature=1.0)
    seed, free = next((s, t) for s in range(50) for t in reference(local, prompt, [banned], seed=s, **kw) if HANGUL.match(t))
    word = prompt[-1] + free[0]
    assert word not in prompt and (prompt + free).index(word) == len(prompt) - 1  # it spans the prompt's end
    with _filters(server, output_banned_words=[banned, word]):
        status, r = _post(url + "/v1/completions", {"prompt": prompt, "seed": seed, "echo": True, "max_tokens": 4, "temperature": 1.0})
    assert status == 200, r
    text = r["choices"][0]["text"]
    assert text.startswith(prompt) and word not in text
    assert text == prompt + reference(local, prompt, [banned, word], seed=seed, **kw)[0]

    for prompt in (f"헌법은 {banned}", f"헌법은 {banned[0]}\u0001{banned[1:]}"):
        for extra in ({}, {"stream": True}, {"logprobs": 2}):
            status, r = _post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 2, "echo": True, **extra})
            assert status == 400 and r["error"]["code"] == "output_filtered" and r["error"]["param"] == "echo", r
            assert banned not in r["error"]["message"]
        status, r = _post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 2})  # without echo: served
        assert status == 200 and banned not in r["choices"][0]["text"]
    _assert_healthy(server)


def test_near_zero_temperature_or_top_p_is_greedy(server, local, banned):
    # Point 10: a temperature or top_p of 1e-300 was a 500 ("probability tensor contains inf/nan").
    url = server["url"]
    greedy = reference(local, "국회는", [banned], max_new_tokens=8, temperature=0)[0]
    for extra in ({"temperature": 1e-300}, {"temperature": 1e-30}, {"top_p": 1e-300}, {"top_p": 1e-300, "top_k": 3}):
        status, r = _post(url + "/v1/completions", {"prompt": "국회는", "max_tokens": 8, "seed": 1, **extra})
        assert status == 200 and r["choices"][0]["text"] == greedy, (extra, r)
    chat = {"messages": [{"role": "user", "content": "국회는"}], "max_tokens": 4, "temperature": 1e-300, "top_p": 1e-300}
    assert _post(url + "/v1/chat/completions", chat)[0] == 200
    _assert_healthy(server)


def test_a_client_leaving_a_plain_request_frees_its_worker(server):
    # Point 10: a client that dropped a non-streamed request kept a worker busy to the end (8 dropped n=16
    # requests held it 17 s). Both workers take one long request; both clients leave.
    host, port = server["url"].split("/")[2].split(":")
    before = _metric(server, "clova_cancelled_requests")
    body = json.dumps({"prompt": "국회는", "max_tokens": 1000, "n": 16, "temperature": 1.0, "seed": 1})
    conns = []
    for _ in range(2):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        conns.append(conn)
    busy = lambda: json.loads(_get(server["url"] + "/health")[1])["busy"]  # noqa: E731
    for _ in range(300):
        if busy() == 2:
            break
        time.sleep(0.05)
    assert busy() == 2
    for conn in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    for _ in range(300):
        if _metric(server, "clova_cancelled_requests") >= before + 2:
            break
        time.sleep(0.05)
    assert _metric(server, "clova_cancelled_requests") == before + 2
    assert busy() == 0
    status, r = _post(server["url"] + "/v1/completions", {"prompt": "국회는", "max_tokens": 2, "temperature": 0})
    assert status == 200, r
