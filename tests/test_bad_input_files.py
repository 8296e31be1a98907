"""Files from elsewhere, round 2 (issue 22): checkpoints that are not regular files, that ask for memory or
that have another structure, and corpus text no UTF-8 encoder takes, each through the real CLI.

Every command runs in a subprocess with a timeout, so a hang fails its test instead of stopping the suite;
each failure must be one line naming the file, with no traceback. The checkpoints are copies of the
session's real ZeRO-3 run (conftest ``trained_run``: steps 12 and 16 kept), damaged after copying.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import clova_cli
from test_bad_input import NSMC, copy_run, held_lock, newest_tag, one_line  # noqa: F401 (held_lock: a fixture)

TIMEOUT = 120  # each command; all of them take seconds when nothing hangs


def clova(*args, env: dict | None = None):
    return clova_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=TIMEOUT)


def failed(r, *fragments: str) -> str:
    return one_line(r.stdout + r.stderr, 2, r.returncode, *fragments)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec from the forking process (here, pytest).
_PEAK = (
    "import atexit, sys\n"
    "hwm = lambda: next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
    "atexit.register(lambda: print('peak_rss_kb', hwm(), file=sys.stderr))\n"
    "from clova_train.cli import app\n"
    "app()\n"
)


def export_peak_rss(run: Path, out: Path):
    """`clova export RUN --out OUT` in a child that reports its own peak RSS: (CompletedProcess, KiB)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _PEAK, "export", str(run), "--out", str(out), "-q"], capture_output=True,
                       text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("peak_rss_kb")]
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("peak_rss_kb"))
    return r, peak[0]


def recorded(pt: Path) -> None:
    """Whoever hands out a damaged run dir can write its completion marker too: make it record ``pt``'s size."""
    done = pt.parent / "clova_checkpoint.json"
    info = json.loads(done.read_text(encoding="utf-8"))
    info["files"][pt.name] = pt.stat().st_size
    done.write_text(json.dumps(info), encoding="utf-8")


def resave(pt: Path, change) -> None:
    obj = torch.load(pt, map_location="cpu", weights_only=False)  # our own file, written by the fixture run
    change(obj)
    torch.save(obj, pt)
    recorded(pt)


class _Call:
    """Unpickles as ``fn(*args)``: what a hostile checkpoint asks the unpickler to run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(scope="module")
def clean_export(trained_run, tmp_path_factory):
    """(the HF dir exported from the intact run, the export's peak RSS in KiB)."""
    out = tmp_path_factory.mktemp("clean") / "hf"
    r, peak = export_peak_rss(trained_run, out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, peak


# ---------------------------------------------------------------- 5. a rank file that is not a regular file


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "outside"])
def test_rank_file_that_is_not_a_regular_file_is_named_before_anything_reads_it(trained_run, tmp_path, kind):
    """A symlink to /dev/zero made export read forever, a FIFO hung it: now each command names the file first."""
    run = copy_run(trained_run, tmp_path)
    pt = newest_tag(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (tmp_path / "nsmc.tsv").write_text(NSMC, encoding="utf-8")
    if kind == "dev_zero":
        pt.unlink()
        pt.symlink_to("/dev/zero")
        why = "is a symlink to /dev/zero, outside the run dir"
        commands = [("export", run, "--out", tmp_path / "hf", "-q"),
                    ("ptune", run, "--task", "nsmc", "--train", tmp_path / "nsmc.tsv", "--valid", tmp_path / "nsmc.tsv",
                     "--out", tmp_path / "pt", "-q")]
    elif kind == "fifo":
        pt.unlink()
        os.mkfifo(pt)
        why = "is a FIFO, not a regular file"
        commands = [("generate", run, "안녕", "--max-new-tokens", 2),
                    ("train", "--out", run, "--resume", "--steps", 20, "--nproc-per-node", 1)]
    else:  # the same bytes, but elsewhere: a run dir must not make us read files outside it
        pt.rename(tmp_path / "elsewhere.pt")
        pt.symlink_to(tmp_path / "elsewhere.pt")
        why = "outside the run dir"
        commands = [("eval", run, "--task", "nsmc", "--data", tmp_path / "nsmc.tsv", "-q", "--out", tmp_path / "e.json")]
    for args in commands:
        fix = "--resume-step 12" if args[0] == "train" else "`clova export --step 12`"
        failed(clova(*args), pt.name, why, "step_00000016 is damaged", fix)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "pt").exists()


# ---------------------------------------------------------------- 6. pickles that ask for memory


@pytest.mark.parametrize("attack", ["bytearray", "compressed"])
def test_checkpoint_asking_for_memory_is_refused_within_twice_a_clean_exports_peak(trained_run, clean_export, tmp_path, attack):
    """A 15 KB model-states file calling bytearray(10**9), or a data.pkl that inflates 400-fold: refused before
    anything is allocated, by export (peak RSS at most twice a clean export's) and by resume (one gate for both)."""
    run = copy_run(trained_run, tmp_path)
    pt = newest_tag(run) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if attack == "bytearray":
        resave(pt, lambda obj: obj.update(extra=_Call(bytearray, 10**9)))
        why = "asks for builtins.bytearray(int)"
    else:  # 400 MB of zeros after the pickle's STOP: never unpickled, but a reader unpacks the record whole
        with zipfile.ZipFile(pt) as z:
            records = [(i.filename, z.read(i)) for i in z.infolist()]
        with zipfile.ZipFile(pt, "w") as z:
            for name, data in records:
                info = zipfile.ZipInfo(name)
                if not name.endswith("/data.pkl"):
                    z.writestr(info, data)
                    continue
                info.compress_type = zipfile.ZIP_DEFLATED
                with z.open(info, "w", force_zip64=True) as f:
                    f.write(data)
                    for _ in range(400):  # streamed: this test's own memory stays small
                        f.write(bytes(1_000_000))
        assert pt.stat().st_size < 2_000_000
        recorded(pt)
        why = "data.pkl' is compressed"
    r, peak = export_peak_rss(run, tmp_path / "hf")
    failed(r, pt.name, why, "refusing to load it")
    assert peak <= 2 * clean_export[1], f"peak RSS {peak} KiB, a clean export's {clean_export[1]} KiB"
    if attack == "bytearray":  # the same layout: the gate before DeepSpeed's torch.load, which would run the pickle for real
        failed(clova("train", "--out", run, "--resume", "--steps", 20, "--nproc-per-node", 2), pt.name, why)


def _pickle_zip(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "payload, why",
    [
        (lambda: _Call(torch.Tensor, 10**10), "torch.Tensor(...)"),
        (lambda: _Call(np.ndarray, (10**10,)), "numpy.ndarray(...)"),
        (lambda: _Call(np.zeros(0).__reduce__()[0], np.ndarray, (10**10,), b"b"), "_reconstruct of anything but an empty ndarray"),
        (lambda: np.array([None, 1], dtype=object), "numpy.dtype('O8')"),
    ],
)
def test_allow_list_allocates_no_size_the_pickle_chooses(tmp_path, payload, why):
    """The callables torch.save never calls with a size (in-process: the same gate export and resume use)."""
    from clova_train.core.errors import ClovaError
    from clova_train.core.safe_pickle import check_torch_file

    pt = _pickle_zip(tmp_path / "x.pt", {"ok": torch.zeros(3), "bad": payload()})
    with pytest.raises(ClovaError, match="refusing to load it") as e:
        check_torch_file(pt)
    assert why in str(e.value)


def test_storage_larger_than_its_record_is_refused(tmp_path):
    """torch.load allocates the element count the pickle names; it must fit in the bytes the file stores."""
    from clova_train.core.errors import ClovaError
    from clova_train.core.safe_pickle import check_torch_file

    pt = tmp_path / "x.pt"
    torch.save({"t": torch.zeros(4)}, pt)
    with zipfile.ZipFile(pt) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(pt, "w") as z:
        for name, data in records:
            # The persistent id's element count follows its location ("cpu", memoized): K\x04 (4) becomes 10**9.
            if name.endswith("data.pkl"):
                assert data.count(b"cpuq\x06K\x04t") == 1
                data = data.replace(b"cpuq\x06K\x04t", b"cpuq\x06J\x00\xca\x9a\x3bt")
            z.writestr(name, data)
    with pytest.raises(ClovaError, match="damaged"):
        check_torch_file(pt)
    numpy_state = tmp_path / "rng.pt"  # what clova train once pickled: numbers pass, as numpy rebuilds them
    torch.save({"numpy": np.random.get_state(), "scalar": np.float64(0.5)}, numpy_state)
    check_torch_file(numpy_state)


# ---------------------------------------------------------------- 7. another structure behind the gate


def test_model_states_without_param_shapes_is_one_line_in_export_and_resume(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    pt = newest_tag(run) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    resave(pt, lambda obj: obj.pop("param_shapes"))
    why = "does not look like a DeepSpeed ZeRO-3 model-states file: no 'param_shapes'"
    failed(clova("export", run, "--out", tmp_path / "hf", "-q"), pt.name, why)
    # Another world size: the checkpoint is read through the same reader, re-sharded.
    failed(clova("train", "--out", run, "--resume", "--steps", 20, "--nproc-per-node", 1), pt.name, why)


def test_optimizer_states_of_another_shape_is_one_line_in_export_and_same_layout_resume(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    pt = newest_tag(run) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    resave(pt, lambda obj: obj["optimizer_state_dict"].update(partition_count="two"))
    failed(clova("export", run, "--out", tmp_path / "hf", "-q"), pt.name, "optimizer-states file: ValueError")
    resave(pt, lambda obj: obj["optimizer_state_dict"].update(partition_count=2) or obj["optimizer_state_dict"].pop("fp32_flat_groups"))
    why = "does not look like a DeepSpeed ZeRO-3 optimizer-states file: no 'fp32_flat_groups'"
    failed(clova("export", run, "--out", tmp_path / "hf", "-q"), pt.name, why)
    # The same layout: DeepSpeed's own loader would meet it, with a KeyError on rank 0 while rank 1 waits.
    failed(clova("train", "--out", run, "--resume", "--steps", 20, "--nproc-per-node", 2), pt.name, why)


# ---------------------------------------------------------------- 8. a lone surrogate in a corpus


SURROGATE = '{"text": "대한민국은 민주공화국이다."}\n{"text": "깨진 \\ud800 글자"}\n{"text": "모든 권력은 국민으로부터 나온다."}\n'


def test_lone_surrogate_is_bad_input_in_tokenize_dedup_and_tokenizer_train(tmp_path, tokenizer_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(SURROGATE, encoding="utf-8")
    where = f"{corpus}: line 2: a lone surrogate (\\ud800 at character 3)"
    for args in (
        ("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "shards", "-q", "--workers", 1),
        ("dedup", corpus, "--out", tmp_path / "dedup", "-q"),
        ("tokenizer", "train", corpus, "--out", tmp_path / "tok", "--vocab-size", 300, "-q"),
    ):
        failed(clova(*args), where, "--on-error skip")
    for args in (
        ("tokenize", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "shards_skip", "-q", "--workers", 1),
        ("dedup", corpus, "--out", tmp_path / "dedup_skip", "-q"),
    ):
        r = clova(*args, "--on-error", "skip")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert json.loads((tmp_path / "shards_skip" / "manifest.json").read_text())["skipped"]["by_reason"] == {"lone_surrogate": 1}
    dedup = json.loads((tmp_path / "dedup_skip" / "manifest.json").read_text())
    assert dedup["totals"]["removed"]["lone_surrogate"] == 1 and dedup["totals"]["documents_read"] == 3


def test_lone_surrogate_in_small_jsonl_inputs_is_one_line(tmp_path):
    """Eval data and prompt files go through core.textfiles: the same check, anywhere in the object."""
    from clova_train.core.errors import ClovaError
    from clova_train.core.textfiles import iter_jsonl

    data = tmp_path / "korquad.jsonl"
    data.write_text('{"context": "맑음", "qas": [{"question": "날씨는?"}]}\n{"context": "흐림", "qas": [{"question": "\\udc00?"}]}\n',
                    encoding="utf-8")
    with pytest.raises(ClovaError, match=r"korquad\.jsonl:2: a lone surrogate \(\\udc00 at character 0\)"):
        list(iter_jsonl(data))
    assert [n for n, _ in iter_jsonl(data, skip_bad=True)] == [1]


# ---------------------------------------------------------------- 9. one dedup per output dir


def test_second_dedup_on_one_out_fails_at_once_naming_the_first(held_lock, tmp_path, konlpy_files):
    out = tmp_path / "clean"
    pid = held_lock(out)  # the lock a running `clova dedup` holds (core.lock, as tokenize, train and export take it)
    failed(clova("dedup", konlpy_files[0], "--out", out, "-q"), out, f"pid {pid} on host", "is writing here")
    assert [p.name for p in out.iterdir()] == [".clova.lock"]


# ---------------------------------------------------------------- 10. the smaller file items


def test_dedup_max_chars_as_tokenize(tmp_path):
    corpus = tmp_path / "c.jsonl"
    long = "대한민국의 주권은 국민에게 있다. " * 200
    corpus.write_text(json.dumps({"text": "짧은 문서입니다."}, ensure_ascii=False) + "\n" + json.dumps({"text": long}, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    failed(clova("dedup", corpus, "--out", tmp_path / "a", "-q", "--max-chars", 1000),
           f"{corpus}: line 2: document of {len(long):,} characters is over --max-chars 1,000")
    r = clova("dedup", corpus, "--out", tmp_path / "b", "-q", "--max-chars", 1000, "--on-error", "skip")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["totals"]["removed"]["too_long"] == 1


def test_damaged_checkpoint_names_the_step_to_use(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    pt = newest_tag(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    msg = failed(clova("export", run, "--out", tmp_path / "hf", "-q"), pt.name, "the completion marker recorded",
                 "`clova export --step 12`", "--resume-step 12")
    assert "another step" not in msg
    failed(clova("export", run, "--out", tmp_path / "hf", "-q", "--step", 16), "step_00000016 is damaged")
    assert clova("export", run, "--out", tmp_path / "hf", "-q", "--step", 12).returncode == 0
    # The same size, other bytes (the marker cannot tell): the reader's line says what to do as well.
    recorded(pt)
    failed(clova("export", run, "--out", tmp_path / "hf2", "-q"), pt.name, "--resume-step N")


def test_export_without_its_tokenizer_meta_is_refused(clean_export, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(clean_export[0], hf)
    (hf / "clova_tokenizer.json").unlink()  # tokenizer.json alone: a plain byte-level BPE with other ids
    failed(clova("generate", hf, "안녕", "--max-new-tokens", 2), hf, "without clova_tokenizer.json")
