"""Files from elsewhere never run code, and every bad input is one line (issue 12), through the real CLI.

Each case runs a `clova` command on a broken or hostile input and checks the exit code, that the message
is one line naming the file, and that no traceback is printed. The malicious-checkpoint cases rewrite one
.pt of the session's real ZeRO-3 and pipeline runs with a pickle whose reduce runs ``os.system``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clova_train.cli import app

from conftest import clova_cli

runner = CliRunner()
NSMC = "id\tdocument\tlabel\n1\t정말 재미있는 영화였다\t1\n2\t지루하고 별로였다\t0\n"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(output: str, code: int, exit_code: int, *fragments: str) -> str:
    """The command failed with ``code``, printed one error line containing ``fragments`` and no traceback."""
    assert exit_code == code, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    msg = " ".join(output[output.index("error:"):].split())  # rich may wrap the line on a narrow terminal
    for f in fragments:
        assert str(f) in msg, msg
    return msg


# ---------------------------------------------------------------- no code from checkpoints


class _Payload:
    """Unpickles as builtins.eval(...) creating the marker file: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('os').system('touch {self.marker}') or 0",))


def poison(pt: Path, marker: Path) -> None:
    """Rewrite ``pt`` (a real DeepSpeed file of ours) with the payload added to its top-level dict.

    Whoever hands out a run dir writes its completion marker too, so the marker's size record is made to match:
    the file must be refused for what its pickle asks for, not for its size.
    """
    obj = torch.load(pt, map_location="cpu", weights_only=False)  # our own file, written by the fixture run
    obj["extra"] = _Payload(marker)
    torch.save(obj, pt)
    assert b"eval" in pt.read_bytes()  # the pickle really names builtins.eval
    done = pt.parent / "clova_checkpoint.json"
    if done.is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        if pt.name in info.get("files", {}):
            info["files"][pt.name] = pt.stat().st_size
            done.write_text(json.dumps(info), encoding="utf-8")


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def newest_tag(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _refusals(run: Path, tmp_path: Path, marker: Path, name: str) -> None:
    (tmp_path / "nsmc.tsv").write_text(NSMC, encoding="utf-8")
    for args in (
        ("export", run, "--out", tmp_path / "hf", "-q"),
        ("generate", run, "안녕", "--max-new-tokens", "2"),
        ("eval", run, "--task", "nsmc", "--data", tmp_path / "nsmc.tsv", "-q", "--out", tmp_path / "e.json"),
    ):
        r = cli(*args)
        one_line(r.output, 2, r.exit_code, name, "builtins.eval", "refusing to load")
        assert not marker.exists(), f"clova {args[0]} ran the payload"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("which", ["model_states", "optim_states"])
def test_zero3_checkpoint_with_code_is_refused(trained_run, tmp_path, which):
    run = copy_run(trained_run, tmp_path)
    pt = next(newest_tag(run).glob(f"zero_pp_rank_0_mp_rank_00_{which}.pt"))
    marker = tmp_path / "PWNED"
    poison(pt, marker)
    _refusals(run, tmp_path, marker, pt.name)


@pytest.mark.parametrize("which", ["zero_pp_rank_0_mp_rank_01_optim_states.pt", "mp_rank_00_model_states.pt", "layer_00-model_states.pt"])
def test_pipeline_checkpoint_with_code_is_refused(pipeline_run, tmp_path, which):
    run = copy_run(pipeline_run["run"], tmp_path)
    pt = newest_tag(run) / which
    marker = tmp_path / "PWNED"
    poison(pt, marker)
    _refusals(run, tmp_path, marker, pt.name)


@pytest.mark.parametrize("mode", ["zero3", "pipeline"])
def test_resume_refuses_checkpoint_with_code(trained_run, pipeline_run, tmp_path, mode):
    """`clova train --resume` checks every file before DeepSpeed's torch.load(weights_only=False) opens it."""
    src = trained_run if mode == "zero3" else pipeline_run["run"]
    run = copy_run(src, tmp_path)
    which = "zero_pp_rank_1_mp_rank_00_model_states.pt" if mode == "zero3" else "mp_rank_01_model_states.pt"
    pt = newest_tag(run) / which
    marker = tmp_path / "PWNED"
    poison(pt, marker)
    r = clova_cli("train", "--out", run, "--resume", "--steps", 20, "--nproc-per-node", 2, env={"OMP_NUM_THREADS": "1"})
    one_line(r.stdout + r.stderr, 2, r.returncode, which, "builtins.eval")
    assert not marker.exists()


def test_allow_list_reads_every_real_checkpoint_file(trained_run, pipeline_run):
    """The exact allow-list admits every file our real ZeRO-3 and pipeline runs write (else resume would refuse them)."""
    from clova_train.core.safe_pickle import check_torch_file

    resumed = pipeline_run["resumed"]  # killed at step 10, resumed through the gate to step 16
    assert resumed.returncode == 0 and "resuming from step_00000008" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    files = [*newest_tag(trained_run).glob("*.pt"), *newest_tag(pipeline_run["run"]).glob("*.pt")]
    assert len(files) >= 8
    for f in files:
        check_torch_file(f)


# ---------------------------------------------------------------- one writer per directory


@pytest.fixture
def held_lock(tmp_path):
    """Start a process that holds a dir lock: yields (start(dir, beside) -> pid)."""
    procs = []

    def start(directory: Path, beside: bool = False) -> int:
        code = (
            "import sys, time\nfrom clova_train.core.lock import dir_lock\n"
            f"l = dir_lock(sys.argv[1], 'test', beside={beside}); l.acquire(); print('held', flush=True); time.sleep(120)"
        )
        p = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_writer_fails_at_once_naming_the_holder(held_lock, tmp_path, tokenizer_dir, konlpy_files, korean_shards, trained_run):
    host = socket.gethostname()
    out = tmp_path / "shards"
    pid = held_lock(out)
    r = cli("tokenize", konlpy_files[0], "--tokenizer", tokenizer_dir, "--out", out, "-q")
    one_line(r.output, 2, r.exit_code, out, f"pid {pid} on host {host}")
    assert not (out / "progress.json").exists()

    run = tmp_path / "run"
    pid = held_lock(run)
    r = cli("train", "--model", "tiny", "--seq-len", 64, "--global-batch", 2, "--micro-batch", 2, "--data", korean_shards,
            "--out", run, "--steps", 1, "--nproc-per-node", 1)
    one_line(r.output, 2, r.exit_code, run, f"pid {pid} on host {host}")
    assert not (run / "launch.json").exists()

    hf = tmp_path / "hf"
    pid = held_lock(hf, beside=True)
    r = cli("export", trained_run, "--out", hf, "-q")
    one_line(r.output, 2, r.exit_code, f"pid {pid} on host {host}")
    assert not hf.exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tokenizer_dir, konlpy_files):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is surely gone
    out = tmp_path / "shards"
    out.mkdir()
    (out / ".clova.lock").write_text(f"{dead.pid} {socket.gethostname()}")
    r = cli("tokenize", konlpy_files[0], "--tokenizer", tokenizer_dir, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert f"taking over the lock of pid {dead.pid}" in " ".join(r.output.split())
    assert (out / "manifest.json").is_file() and not (out / ".clova.lock").exists()


# ---------------------------------------------------------------- full disk, SIGTERM


@pytest.fixture
def small_fs(tmp_path):
    """A real 1.5 MB filesystem (tmpfs; needs root, as CI runs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, konlpy_files) -> Path:
    """About 4 MB of the real text, lines made distinct so dedup keeps them."""
    text = "".join(f.read_text(encoding="utf-8") for f in konlpy_files)
    path = tmp_path_factory.mktemp("big") / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(28):
            f.write(text.replace("\n", f" {i}\n"))
    return path


def test_full_disk_in_tokenize_and_export(small_fs, big_corpus, tokenizer_dir, trained_run):
    from clova_train.shards.format import check_shard

    out = small_fs / "shards"
    r = cli("tokenize", big_corpus, "--tokenizer", tokenizer_dir, "--out", out, "--shard-tokens", 100000, "--workers", 1, "-q")
    msg = one_line(r.output, 2, r.exit_code, out, "No space left on device", "rerun the same command")
    state = json.loads((out / "progress.json").read_text())
    assert f"{len(state['shards'])} finished shard(s)" in msg and state["shards"]
    recorded = {f"{rec['prefix']}.{ext}" for rec in state["shards"] for ext in ("bin", "idx", "keys")}
    assert {f.name for f in out.iterdir()} == recorded | {"progress.json"}  # nothing unfinished, no temporaries
    for rec in state["shards"]:
        check_shard(out / rec["prefix"], rec, eod_id=state["tokenizer"]["eod_id"], vocab_size=state["tokenizer"]["vocab_size"])

    shutil.rmtree(out)
    (small_fs / "filler").write_bytes(b"\0" * 1_200_000)
    hf = small_fs / "hf"
    r = cli("export", trained_run, "--out", hf, "-q", "--no-verify")
    one_line(r.output, 2, r.exit_code, hf, "No space left on device", "nothing was left")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_sigterm_during_tokenize_is_one_line_and_resumable(big_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "shards"
    args = [sys.executable, "-c", "from clova_train.cli import app; app()", "tokenize", str(big_corpus),
            "--tokenizer", str(tokenizer_dir), "--out", str(out), "--workers", "2", "-q"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (out / "progress.json").exists() and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # the whole process group, as Slurm or a shell's kill does
    stdout, stderr = p.communicate(timeout=120)
    one_line(stdout + stderr, 130, p.returncode, out, "interrupted (SIGTERM)", "rerun the same command to resume")
    assert not [f for f in out.iterdir() if ".tmp-" in f.name]
    r = cli("tokenize", big_corpus, "--tokenizer", tokenizer_dir, "--out", out, "--workers", 2, "-q")
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file()


_SIGTERM_AT_POOL_START = """
import multiprocessing as mp, os, signal, sys, time
from clova_train.core.signals import Terminated, stop_on_sigterm
from clova_train.shards.guard import worker_pool

class SignalledWhileForking:  # a real fork pool; the group's SIGTERM lands while its workers start
    def Pool(self, *args, **kwargs):
        pool = mp.get_context("fork").Pool(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # blocked here, so pending until worker_pool unblocks it
        return pool

with stop_on_sigterm():
    try:
        # the workers take a while to start, as loading the tokenizer does
        with worker_pool(SignalledWhileForking(), 2, time.sleep, (0.5,)) as pool:
            pool.apply(print, ("task ran",))
    except Terminated:
        sys.exit(130)
"""


def test_sigterm_while_the_pool_starts_still_closes_it():
    # The window CI once hit: a pending SIGTERM raised before the pool was handed out left it to its
    # finalizer, which waits for workers that ignore SIGTERM; the process printed its line and never exited.
    r = subprocess.run([sys.executable, "-c", _SIGTERM_AT_POOL_START], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert "task ran" not in r.stdout  # the signal stops the work before any task is handed out


# ---------------------------------------------------------------- the table: one command, one line


def _zst_named_txt(d: Path) -> list:
    import zstandard

    from conftest import konlpy_corpus_dir

    f = d / "corpus.txt"  # compressed, then renamed: a few NUL bytes, mostly undecodable lines
    f.write_bytes(zstandard.ZstdCompressor().compress((konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_bytes()))
    return [f, "--on-error", "skip"]


def _random_binary(d: Path) -> list:
    f = d / "noise.txt"
    f.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(20000)).replace(b"\0", b"\1"))
    return [f, "--on-error", "skip"]


def _all_invalid(d: Path) -> list:
    f = d / "bad.jsonl"
    f.write_text('{"title": "no text key"}\n[1, 2]\n', encoding="utf-8")
    return [f, "--on-error", "skip"]


def _empty(d: Path) -> list:
    f = d / "empty.txt"
    f.write_text("\n\n", encoding="utf-8")
    return [f]


@pytest.mark.parametrize(
    "make, fragments",
    [
        (_zst_named_txt, ["corpus.txt", "no training document", "binary_file: 1"]),
        (_random_binary, ["noise.txt", "no training document", "binary_file: 1"]),
        (_all_invalid, ["bad.jsonl", "no training document", "missing_text_key: 2"]),
        (_empty, ["no training document", "no documents"]),
    ],
    ids=["zst-renamed-txt", "random-bytes", "all-skipped", "empty"],
)
def test_tokenize_nothing_usable(make, fragments, tmp_path, tokenizer_dir):
    args = make(tmp_path)
    r = cli("tokenize", *args, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", "-q")
    one_line(r.output, 2, r.exit_code, *fragments)


BAD_DS = [
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 1}}, "zero_optimization.stage3_prefetch_bucket_sise: unknown key"),
    ({"zero_optimization": {"stage": 3, "overlap_comm": "sometimes"}}, "zero_optimization.overlap_comm: Input should be a valid boolean"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memroy": True}}}, "offload_param.pin_memroy: unknown key"),
    ({"gradient_clipping": 1.0, "zero_optimisation": {"stage": 3}}, "zero_optimisation: unknown key"),
    ({"bf16": {"enabled": "maybe"}}, "bf16.enabled: Input should be a valid boolean"),
]


@pytest.mark.parametrize("config, fragment", BAD_DS, ids=["nested-unknown", "wrong-type", "deep-unknown", "top-unknown", "bf16-type"])
def test_deepspeed_json_checked_before_any_rank(config, fragment, tmp_path, korean_shards):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    r = cli("train", "--model", "tiny", "--data", korean_shards, "--out", run, "--steps", 1, "--nproc-per-node", 2, "--deepspeed", path)
    one_line(r.output, 2, r.exit_code, path, fragment)
    assert not run.exists()


def test_shipped_deepspeed_templates_pass_the_check():
    from clova_train.training.parallel.ds_validate import validate_deepspeed

    for path in sorted((Path(__file__).resolve().parents[1] / "deepspeed_configs").glob("*.json")):
        validate_deepspeed(json.loads(path.read_text()), path)


BOM = b"\xef\xbb\xbf"


def test_bom_is_dropped_in_every_text_input(tmp_path, tokenizer_dir):
    from clova_train.core.textfiles import iter_jsonl, read_lines
    from clova_train.evaluation.prompts import load_template
    from clova_train.evaluation.tasks import TASKS, read_examples
    from clova_train.shards.format import IndexedDataset

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(BOM + '{"text": "대한민국은 민주공화국이다."}\n{"text": "둘째 문서"}\n'.encode())
    txt = tmp_path / "c.txt"
    txt.write_bytes(BOM + "첫째 줄이다.\n".encode())
    out = tmp_path / "out"
    r = cli("tokenize", jsonl, txt, "--tokenizer", tokenizer_dir, "--out", out, "-q", "--valid-fraction", 0)
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert [i["documents_read"] for i in man["inputs"]] == [2, 1] and man["skipped"]["total"] == 0
    from clova_train.tokenizer.bpe import ClovaTokenizer

    tok = ClovaTokenizer.load(tokenizer_dir)
    ds = IndexedDataset(out / "train-00000")
    texts = {tok.decode(list(ds[i][:-1])) for i in range(len(ds))}
    assert texts == {"대한민국은 민주공화국이다.", "둘째 문서", "첫째 줄이다."}

    words = tmp_path / "banned.txt"
    words.write_bytes(BOM + "바보\n멍청이\n".encode())
    assert read_lines(words) == ["바보", "멍청이"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(BOM + '{"prompt": "안녕"}\n'.encode())
    assert [o for _, o in iter_jsonl(prompts)] == [{"prompt": "안녕"}]
    tpl = tmp_path / "t.json"
    tpl.write_bytes(BOM + json.dumps({"query": "{document}", "verbalizers": {"0": " 부정", "1": " 긍정"}}).encode())
    assert load_template(TASKS["nsmc"], tpl).query == "{document}"
    data = tmp_path / "n.tsv"
    data.write_bytes(BOM + NSMC.encode())
    assert len(read_examples(TASKS["nsmc"], data)) == 2


@pytest.mark.parametrize(
    "template, fragment",
    [
        ({"query": 123}, "query must be a string"),
        ({"query": "{document}", "verbalizers": {"0": 0, "1": 1}}, "verbalizers must map each label to a string"),
        ({"query": "{document:>50000000}"}, "{document:>50000000}: only plain {field}"),
        ({"query": "{document!r}"}, "{document!r}: only plain {field}"),
        ({"query": "{document.__class__}"}, "only plain {field}"),
        (b"\xff\xfe\x00\x01binary", "not UTF-8 text"),
    ],
    ids=["query-int", "verbalizer-int", "format-spec", "conversion", "attribute", "undecodable"],
)
def test_bad_templates(template, fragment, tmp_path, tiny_lm_dir):
    path = tmp_path / "tpl.json"
    path.write_bytes(template if isinstance(template, bytes) else json.dumps(template).encode())
    (tmp_path / "n.tsv").write_text(NSMC, encoding="utf-8")
    r = cli("eval", tiny_lm_dir, "--task", "nsmc", "--data", tmp_path / "n.tsv", "--template", path, "-q")
    one_line(r.output, 2, r.exit_code, path, fragment)


def test_banned_words_binary_file(tmp_path, tiny_lm_dir):
    path = tmp_path / "banned.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    r = cli("generate", tiny_lm_dir, "안녕", "--banned-words", path, "--max-new-tokens", 2)
    one_line(r.output, 2, r.exit_code, path, "pass a UTF-8 text file")
