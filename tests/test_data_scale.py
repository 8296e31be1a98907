"""Data at scale: sample indices built once and memory-mapped, bounded open files, validation spread over all dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clova_train.cli import app
from clova_train.core.errors import ClovaError
from clova_train.shards.format import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, OPEN_SHARDS, IndexedDatasetWriter, open_split
from clova_train.shards.index import IndexCache, ORDER_VERSION, all_sizes, build_indices, epochs_needed
from clova_train.training.data.sampler import (
    DataConfig, TrainStream, check_order_version, eval_batches, open_train_data, open_valid_data, prepare_indices,
)


def shard_dir(path: Path, n_docs: int, *, shards: int = 2, valid_docs: int = 0, seed: int = 0, base: int = 1) -> Path:
    """A shard dir written with the real writer and a manifest (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    records = []
    for split, count, parts in (("train", n_docs, shards), ("valid", valid_docs, 1 if valid_docs else 0)):
        for p, docs in enumerate(np.array_split(np.arange(count), parts) if parts else []):
            prefix = f"{split}-{p:05d}"
            with IndexedDatasetWriter(path / prefix, np.uint16) as w:
                for _ in docs:
                    w.add_document(list(rng.integers(base, base + 1000, rng.integers(1, 30))) + [0])
                info = w.finalize()
            records.append({"prefix": prefix, "split": split, **info, "dtype": "uint16"})
    man = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "shards": records,
           "tokenizer": {"hash": "t", "eod_id": 0, "vocab_size": 4096}}
    (path / MANIFEST).write_text(json.dumps(man))
    return path


def todays_samples(shards, seq_len: int, seed: int, stream: int, epoch: int) -> list[np.ndarray]:
    """The in-RAM sampler of commit 868b3f8, written out: the cached order must equal it."""
    docs = [np.asarray(s[i], dtype=np.int64) for s in shards for i in range(len(s))]
    n_tokens = sum(len(d) for d in docs)
    rng = np.random.default_rng([seed, stream, epoch])
    order = rng.permutation(len(docs))
    windows = rng.permutation((n_tokens - 1) // seq_len)
    tokens = np.concatenate([docs[i] for i in order])
    return [tokens[j * seq_len : j * seq_len + seq_len + 1] for j in windows]


def test_cached_index_keeps_todays_order_and_every_rank_maps_it(tmp_path):
    d = shard_dir(tmp_path / "a", 300, shards=3)
    cache = tmp_path / "cache"
    built = build_indices([d], cache, seq_len=16, seed=5, epochs=[2])
    assert built["built"] == 3 and built["kept"] == 0  # 2 train epochs + the validation set
    again = build_indices([d], cache, seq_len=16, seed=5, epochs=[2])
    assert again["built"] == 0 and again["kept"] == 3
    ds, = open_train_data([d], 16, 5, cache=cache)
    for e in range(2):
        ref = todays_samples(open_split(d), 16, 5, 0, e)
        assert len(ref) == len(ds)
        assert all(np.array_equal(ds[e * len(ds) + k], ref[k]) for k in range(len(ds)))
    order, starts, windows = ds._epoch(0)
    assert all(isinstance(a, np.memmap) for a in (order, starts, windows))  # mapped, not loaded
    assert order.dtype == np.int32 and windows.dtype == np.int32 and starts.dtype == np.int64
    # On disk: at most 12 bytes per document and 8 per sample (plus the .npy headers).
    entry = cache / ds.epoch_key(0)
    data_bytes = sum(np.load(f, mmap_mode="r").nbytes for f in entry.glob("*.npy"))
    assert data_bytes <= 12 * (300 + 1) + 8 * len(ds)
    # Another seed, seq_len or dir order is another key; the in-RAM path (no cache) agrees with the cache.
    plain, = open_train_data([d], 16, 5)
    assert all(np.array_equal(plain[k], ds[k]) for k in range(0, len(ds), 7))
    assert open_train_data([d], 16, 6, cache=cache)[0].epoch_key(0) != ds.epoch_key(0)
    assert open_train_data([d], 8, 5, cache=cache)[0].epoch_key(0) != ds.epoch_key(0)


def test_blended_streams_from_the_cache_do_not_depend_on_the_number_of_ranks(tmp_path):
    a, b = shard_dir(tmp_path / "a", 200, seed=1), shard_dir(tmp_path / "b", 120, seed=2, base=2000)
    data = DataConfig(paths=[str(a), str(b)], weights=[3, 1], cache=str(tmp_path / "cache"))
    total = 40 * 8
    one, _ = prepare_indices(data, 16, 7, total, build=True)
    two, _ = prepare_indices(data, 16, 7, total, build=False)  # finds everything built, waits for nothing
    s1 = TrainStream(one, data.weights, global_batch=8, micro_batch=2, rank=0, world=1)
    s2 = [TrainStream(two, data.weights, global_batch=8, micro_batch=2, rank=r, world=2) for r in range(2)]
    for _ in range(40):  # past an epoch boundary of both dirs
        whole = np.concatenate([mb.numpy() for mb in s1.next_batch()])
        split = np.concatenate([mb.numpy() for s in s2 for mb in s.next_batch()])
        assert np.array_equal(whole, split)
    assert s1.position > 2 * len(one[0]) * 3 / 4  # dir a went round more than once
    # Every epoch the run reaches was built ahead: none is missing from the cache.
    store = IndexCache(data.cache)
    for ds, w in zip(one, (0.75, 0.25)):
        assert all(store.ready(ds.epoch_key(e)) for e in range(epochs_needed(len(ds), w, total)))


def test_ranks_wait_for_the_cache_on_the_file_system_with_a_clear_timeout(tmp_path):
    d = shard_dir(tmp_path / "a", 50)
    ds, = open_train_data([d], 16, 1, cache=tmp_path / "cache")
    store = IndexCache(tmp_path / "cache")
    key = ds.epoch_key(0)
    with pytest.raises(ClovaError, match=r"1 of 1 sample-index entries .* still missing after 0 s.*clova shards index"):
        store.wait([key], 0.2, what="test", poll=0.05)
    notes: list[str] = []
    builder = threading.Timer(0.3, lambda: build_indices([d], store.root, seq_len=16, seed=1, epochs=[1]))
    builder.start()
    store.wait([key], 30, what="test", note=notes.append, poll=0.05, every=0.1)
    builder.join()
    assert notes and "waiting for 1 sample-index entries" in notes[0]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no temporary dir left behind


def test_shards_index_command_builds_what_the_run_maps(tmp_path):
    a, b = shard_dir(tmp_path / "a", 80, valid_docs=20), shard_dir(tmp_path / "b", 60, seed=3, valid_docs=10)
    cache = tmp_path / "shared-cache"
    r = CliRunner().invoke(app, ["shards", "index", f"{a}:2", f"{b}:1", "--cache", str(cache), "--seq-len", "16",
                                 "--seed", "9", "--samples", "2000"])
    assert r.exit_code == 0, r.output
    assert "index entries built" in r.output and "--data-cache" in r.output
    data = DataConfig(paths=[str(a), str(b)], weights=[2, 1], cache=str(cache), cache_timeout=0.1)
    prepare_indices(data, 16, 9, 2000, build=False)  # a timeout here would mean other keys than the run's


def test_validation_windows_are_spread_over_every_dir(tmp_path):
    a = shard_dir(tmp_path / "a", 10, valid_docs=200, seed=1, base=1)
    b = shard_dir(tmp_path / "b", 10, valid_docs=200, seed=2, base=2000)
    valid = open_valid_data([a, b], 16, cache=tmp_path / "cache")
    batches = eval_batches(valid, 8, micro_batch=2, rank=0, world=1)
    tokens = np.concatenate([w.numpy().ravel() for w in batches])
    assert (tokens >= 2000).any() and ((tokens > 0) & (tokens < 1001)).any()  # both dirs, not the first 8 windows
    assert eval_batches(valid, 8, micro_batch=2, rank=0, world=1)[0].tolist() == batches[0].tolist()  # fixed


def test_shards_are_mapped_lazily_and_open_files_stay_bounded(tmp_path):
    d = shard_dir(tmp_path / "many", 600, shards=60)
    shards = open_split(d)

    def open_shard_files() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for f in fds.iterdir() if str(d) in os.path.realpath(f))

    assert open_shard_files() == 0  # opening reads the headers only
    limit = OPEN_SHARDS.limit
    OPEN_SHARDS.limit = 8
    try:
        total = sum(int(s[len(s) - 1][-1] == 0) for s in shards)
        assert total == 60
        assert len(all_sizes(shards)) == 600  # what an index build reads keeps no map open either
        assert open_shard_files() <= 2 * 8
    finally:
        OPEN_SHARDS.limit = limit
        OPEN_SHARDS.clear()


def test_the_open_file_limit_is_checked_with_a_one_line_fix():
    code = (
        "import resource, sys\n"
        "from clova_train.shards.format import check_open_files\n"
        "from clova_train.core.errors import ClovaError\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, int(sys.argv[1])))\n"
        "try:\n    check_open_files()\nexcept ClovaError as e:\n    print('ERR', e); sys.exit(0)\n"
        "print('SOFT', resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    run = lambda hard: subprocess.run([sys.executable, "-c", code, str(hard)], capture_output=True, text=True, timeout=60).stdout  # noqa: E731
    assert run(4096).startswith("SOFT 768")  # raised up to the hard limit without asking
    low = run(200)
    assert low.startswith("ERR") and "ulimit -n 768" in low and "\n" not in low.strip()


def test_a_checkpoint_of_another_sample_order_is_refused():
    check_order_version({}, "ckpt")  # before the version was recorded: today's order
    check_order_version({"order_version": ORDER_VERSION}, "ckpt")
    with pytest.raises(ClovaError, match="sample order version 0 .* start a new --out"):
        check_order_version({"order_version": 0}, "ckpt")


def test_a_merged_dirs_stamps_cover_its_node_dirs(tmp_path, tokenizer_dir, konlpy_files):
    from types import SimpleNamespace

    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig
    from clova_train.shards.merge import merge_shard_dirs
    from clova_train.training.run.preflight import check_inputs
    from clova_train.training.rundir import VERIFIED_FILE

    nodes = [tmp_path / f"node-{r}" for r in range(2)]
    for r, d in enumerate(nodes):
        tokenize_corpus(konlpy_files, tokenizer_dir, d, ShardConfig(workers=1, num_nodes=2, node_rank=r), show_progress=False)
    merge_shard_dirs(nodes, tmp_path / "merged")
    spec = SimpleNamespace(run_dir=tmp_path / "run", data=DataConfig(paths=[str(tmp_path / "merged")]), reverify=False)
    check_inputs(spec)
    stamped = {st["bin"]["path"] for st in json.loads((tmp_path / "run" / VERIFIED_FILE).read_text())["shards"].values()}
    assert {str(d.resolve()) for d in nodes} <= {str(Path(p).parent) for p in stamped}  # the node dirs' own files
    # Node 1 re-tokenized (other settings) without re-merging: refused, with the fix.
    import shutil

    shutil.rmtree(nodes[1])
    tokenize_corpus(konlpy_files, tokenizer_dir, nodes[1], ShardConfig(workers=1, num_nodes=2, node_rank=1, min_chars=20), show_progress=False)
    with pytest.raises(ClovaError, match=r"node dir ../node-1 changed since the merge.*clova tokenize merge"):
        check_inputs(spec)


def test_verification_spreads_over_processes_with_the_same_verdicts(korean_shards, tmp_path):
    import shutil

    from clova_train.shards.format import verify_shard_dir

    one = verify_shard_dir(korean_shards)
    two = verify_shard_dir(korean_shards, workers=2)
    assert len(one["stamps"]) >= 2 and one["stamps"] == two["stamps"]
    damaged = tmp_path / "damaged"
    shutil.copytree(korean_shards, damaged)
    f = next(p for p in sorted(damaged.glob("*.bin")) if p.stat().st_size > 100)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(ClovaError, match=rf"{f.name}: sha256 differs"):
        verify_shard_dir(damaged, workers=2)


def test_a_failed_index_build_names_its_cause(tmp_path):
    from clova_train.shards.index import build_in_subprocess

    (tmp_path / "empty").mkdir()
    with pytest.raises(ClovaError, match=r"building the sample index in .* failed: .*empty: no manifest.json"):
        build_in_subprocess([str(tmp_path / "empty")], tmp_path / "cache", seq_len=16, seed=1, epochs=[1])
