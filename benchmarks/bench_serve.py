"""`clova serve` against the same generation in process: tokens/s, the overhead ratio, p50/p99 latency.

Builds a randomly initialised model of a preset (default ``small``: 4 layers,
d_model 128) with a morpheme-aware tokenizer trained on the konlpy text,
saved as a model dir ``load_model`` reads, then in one run:

- in process: ``generate_ids`` on each request's prompt alone, one after another;
- through the server (a ``clova serve`` child, one worker): the same requests
  from one client, one after another, over HTTP (``/v1/completions``);
- through the server from 8 clients at once (8 threads);
- the same requests greedy from 1 and from 8 clients (the server batches those);
- /health's latency idle and while the largest requests the server reads are in
  flight (a prompt of ``max_prompt_chars`` to tokenize, 64 long prompts, a
  body of token ids at the size limit): the event loop must not wait for
  them (goal: the worst /health under 100 ms).

Every request samples (temperature 0.8) with its own seed, so the server must
return the very same text as the in-process run, which is checked. Torch runs
on one thread on both sides. For the one-client ratio the two sides alternate
request by request for ``--rounds`` rounds and each request keeps its
fastest time on each side, so load from elsewhere on a shared machine falls
on both alike. Prints tokens/s, the ratio server/in-process
at one client (goal >= 0.9) and latency percentiles.

Run: ``python benchmarks/bench_serve.py [--preset small] [--requests 24] [--max-tokens 64] [--rounds 3]``
(about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clova_train.inference.generate import GenerateConfig, generate_ids, load_model  # noqa: E402

PROMPTS = ["대한민국은 민주공화국이다.", "국회는", "모든 국민은 인간으로서의 존엄과 가치를 가지며,", "제1조", "대통령은", "법률은", "국가는", "헌법 재판소는"]


def build_model(d: Path, preset: str) -> Path:
    import konlpy

    from clova_train.model.config import ModelConfig, pad_vocab
    from clova_train.model.gpt import GPT
    from clova_train.tokenizer.bpe import ClovaTokenizer
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    corpus = Path(konlpy.__file__).parent / "data" / "corpus"
    files = [corpus / "kolaw" / "constitution.txt", *sorted((corpus / "kobill").glob("*.txt"))]
    train_tokenizer(files, d / "tok", TokenizerConfig(vocab_size=2000), show_progress=False)
    tok = ClovaTokenizer.load(d / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(preset, vocab_size=pad_vocab(tok.vocab_size)))
    model.init_weights()
    out = d / "model"
    out.mkdir()
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
    shutil.copytree(d / "tok", out / "tokenizer")
    return out


def start_server(model_dir: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """A `clova serve` child on a free port, torch on one thread; (process, base URL) once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", "serve", str(model_dir), "--port", "0", "--device", "cpu", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    while not (m := re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text())):
        if proc.poll() is not None:
            sys.exit(f"clova serve failed:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, m[1]


def requests(n: int, max_tokens: int) -> list[dict]:
    return [dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.8, seed=i) for i in range(n)]


def in_process(model, tok, reqs: list[dict]) -> tuple[list[str], list[float], int]:
    texts, latencies, tokens = [], [], 0
    for r in reqs:
        t = time.perf_counter()
        c = generate_ids(model, tok, [tok.encode(r["prompt"])], GenerateConfig(max_new_tokens=r["max_tokens"], temperature=0.8, seed=r["seed"]))[0]
        latencies.append(time.perf_counter() - t)
        texts.append(c.text)
        tokens += len(c.token_ids)
    return texts, latencies, tokens


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def through_server(url: str, reqs: list[dict], clients: int) -> tuple[list[str], list[float], int, float]:
    texts: list[str] = [""] * len(reqs)
    latencies: list[float] = [0.0] * len(reqs)
    tokens = [0] * len(reqs)
    todo = iter(range(len(reqs)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t = time.perf_counter()
            r = post(url, reqs[i])
            latencies[i] = time.perf_counter() - t
            texts[i] = r["choices"][0]["text"]
            tokens[i] = r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return texts, latencies, sum(tokens), time.perf_counter() - t0


def health_latency(url: str, during=None) -> list[float]:
    """Seconds of each /health answer, polled every 20 ms while ``during()`` runs (or 50 times idle)."""
    seconds: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and (during or len(seconds) < 50):
            t = time.perf_counter()
            urllib.request.urlopen(url + "/health", timeout=300).read()
            seconds.append(time.perf_counter() - t)
            time.sleep(0.02)

    th = threading.Thread(target=poll)
    th.start()
    if during:
        time.sleep(0.1)
        during()
        stop.set()
    th.join()
    return seconds


def largest_requests(url: str, vocab: int, context: int) -> None:
    """The biggest work one request can ask of the preparation thread; their answers (often 400s) are not the point."""

    def send(path: str, body: dict) -> None:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=300).read()
        except urllib.error.HTTPError as e:
            e.read()

    send("/v1/tokenize", {"text": "대한민국 국민은 " * 11_000})  # just under the default max_prompt_chars
    send("/v1/completions", {"prompt": ["대한민국 국민은 " * (context // 8)] * 64, "max_tokens": 1})
    send("/v1/completions", {"prompt": [[(i * 7919 + j) % vocab for j in range(context - 2)] for i in range(64)], "max_tokens": 1})


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    proc = None
    try:
        model_dir = build_model(d, args.preset)
        reqs = requests(args.requests, args.max_tokens)
        model, tok = load_model(model_dir, device="cpu")

        proc, url = start_server(model_dir, d / "server.log", "--workers", str(args.workers))
        in_process(model, tok, reqs[:2])  # warm-up on both sides
        through_server(url, reqs[:2], 1)
        # One request in process, then the same through the server, and so on: load from
        # elsewhere on the machine falls on both sides alike. Each keeps a request's fastest round.
        ref_lat, one_lat = [float("inf")] * len(reqs), [float("inf")] * len(reqs)
        for _ in range(args.rounds):
            for i, r in enumerate(reqs):
                _, lat, _ = in_process(model, tok, [r])
                ref_lat[i] = min(ref_lat[i], lat[0])
                _, lat, _, _ = through_server(url, [r], 1)
                one_lat[i] = min(one_lat[i], lat[0])
        ref_texts, _, ref_tokens = in_process(model, tok, reqs)
        one_texts, _, one_tokens, _ = through_server(url, reqs, 1)
        ref_seconds, one_seconds = sum(ref_lat), sum(one_lat)
        many_texts, many_lat, many_tokens, many_seconds = through_server(url, reqs, 8)
        # Greedy requests with equal settings share a batch in the server.
        greedy = [{**r, "temperature": 0} for r in reqs]
        _, g1_lat, g1_tokens, g1_seconds = through_server(url, greedy, 1)
        _, g8_lat, g8_tokens, g8_seconds = through_server(url, greedy, 8)
        with urllib.request.urlopen(url + "/metrics") as resp:
            batched = re.search(r"^clova_batched_requests (\S+)", resp.read().decode(), re.M)[1]
        idle = health_latency(url)
        loaded = health_latency(url, lambda: largest_requests(url, tok.vocab_size, model.cfg.block_size))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)

    same = one_texts == ref_texts and many_texts == ref_texts
    ref_tps, one_tps, many_tps = ref_tokens / ref_seconds, one_tokens / one_seconds, many_tokens / many_seconds
    print(f"model: preset {args.preset}, random init; {args.requests} requests of {args.max_tokens} tokens, "
          f"temperature 0.8, one seed each; torch on 1 thread; server workers {args.workers}; best of {args.rounds} rounds")  # fmt: skip
    print(f"same text through the server as in process: {same}")
    print(f"{'':24}{'tokens/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    rows = [
        ("in process", ref_tps, ref_lat),
        ("server, 1 client", one_tps, one_lat),
        ("server, 8 clients", many_tps, many_lat),
        ("greedy, 1 client", g1_tokens / g1_seconds, g1_lat),
        ("greedy, 8 clients", g8_tokens / g8_seconds, g8_lat),
    ]
    for name, tps, lat in rows:
        print(f"{name:24}{tps:10.1f}{pct(lat, 50) * 1e3:10.1f}{pct(lat, 99) * 1e3:10.1f}")
    print(f"requests that joined another's batch (greedy, equal settings): {float(batched):g}")
    print(f"overhead ratio at 1 client (server tokens/s / in-process tokens/s; goal >= 0.9): {one_tps / ref_tps:.3f}")
    print(f"/health idle: p50 {pct(idle, 50) * 1e3:.1f} ms; during the largest requests: p50 {pct(loaded, 50) * 1e3:.1f} ms, "
          f"worst {max(loaded) * 1e3:.1f} ms over {len(loaded)} answers (goal < 100 ms); worst/idle p50 {max(loaded) / pct(idle, 50):.1f}")  # fmt: skip
    if not same:
        sys.exit("the server's text differs from the in-process generation")


if __name__ == "__main__":
    main()
