"""The shard format: Megatron-compatible files, zero-copy reading, atomic writing, verification."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from clova_train.core.errors import ClovaError
from clova_train.shards.format import IndexedDataset, IndexedDatasetWriter, ShardConfig, dtype_for_vocab, open_split, read_manifest, verify_shard_dir
from clova_train.shards.build import tokenize_corpus


def megatron_read(prefix: Path) -> list[np.ndarray]:
    """An independent reader following Megatron-LM's MMapIndexedDataset layout, field by field.

    Written from the format description (megatron/core/datasets/indexed_dataset.py), not from our
    reader: magic, <Q version, <B dtype code, <Q sequence count, <Q document count, then int32
    sizes, int64 byte pointers and int64 document indices.
    """
    codes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    assert version == 1
    (code,) = struct.unpack("<B", raw[17:18])
    seq_count, doc_count = struct.unpack("<QQ", raw[18:34])
    off = 34
    sizes = np.frombuffer(raw, np.int32, seq_count, off)
    pointers = np.frombuffer(raw, np.int64, seq_count, off + sizes.nbytes)
    doc_idx = np.frombuffer(raw, np.int64, doc_count, off + sizes.nbytes + pointers.nbytes)
    assert len(raw) == off + sizes.nbytes + pointers.nbytes + doc_idx.nbytes
    # Megatron: document i spans sequences doc_idx[i]..doc_idx[i+1]; ours is one sequence per document.
    assert doc_idx[0] == 0 and doc_idx[-1] == seq_count and len(doc_idx) == seq_count + 1
    dtype = np.dtype(codes[code])
    data = Path(f"{prefix}.bin").read_bytes()
    return [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(sizes, pointers)]


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [np.append(rng.integers(1, high, rng.integers(0, 50)), 0) for _ in range(n)]


@pytest.mark.parametrize("vocab_size", [2000, 65536, 70000])
def test_writer_reader_round_trip_and_megatron_layout(tmp_path, vocab_size):
    dtype = dtype_for_vocab(vocab_size)
    docs = random_docs(np.random.default_rng(vocab_size), 300, vocab_size)
    with IndexedDatasetWriter(tmp_path / "s", dtype) as w:
        for d in docs[:100]:
            w.add_document(d.tolist())
        rest = docs[100:]
        w.add_documents(np.concatenate(rest), np.array([len(d) for d in rest]))
    ds = IndexedDataset(tmp_path / "s")
    assert ds.dtype == (np.uint16 if vocab_size <= 65536 else np.int32)
    assert len(ds) == len(docs)
    for i in (0, 1, 99, 100, 299, -1):
        assert np.array_equal(ds[i], docs[i])
    assert np.array_equal(ds.sizes, [len(d) for d in docs])
    assert np.array_equal(ds.doc_idx, np.arange(len(docs) + 1))
    assert [d.tolist() for d in megatron_read(tmp_path / "s")] == [d.tolist() for d in docs]
    code = Path(tmp_path / "s.idx").read_bytes()[17]
    assert code == (8 if dtype == np.uint16 else 4)


def test_documents_are_views_into_the_mapped_file(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        w.add_document([7, 8, 9, 0])
        w.add_document([5, 0])
    ds = IndexedDataset(tmp_path / "s")
    doc = ds[1]
    assert not doc.flags.owndata and not doc.flags.writeable
    assert np.shares_memory(doc, ds.tokens)
    assert ds.get(0, offset=1, length=2).tolist() == [8, 9]
    assert ds.get(0, offset=3, length=10).tolist() == [0]
    with pytest.raises(IndexError):
        ds[2]


def test_nothing_is_visible_until_finalize(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "s", np.uint16)
    w.add_document([1, 2, 0])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    info = w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]
    assert info["documents"] == 1 and info["tokens"] == 3 and info["bin_bytes"] == 6
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "t", np.uint16) as w2:
        w2.add_document([1, 0])
        raise RuntimeError("killed mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


def test_writer_refuses_ids_outside_the_dtype(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        with pytest.raises(ValueError):
            w.add_document([70000, 0])
        with pytest.raises(ValueError):
            w.add_document([-1, 0])


def test_dtype_choice():
    assert dtype_for_vocab(51200) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32


def test_reader_names_a_bad_index(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"not an index at all, sorry" * 3)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ClovaError, match=r"x\.idx: not a Megatron mmap index"):
        IndexedDataset(tmp_path / "x")
    with IndexedDatasetWriter(tmp_path / "y", np.uint16) as w:
        w.add_document([1, 2, 0])
    data = (tmp_path / "y.idx").read_bytes()
    (tmp_path / "y.idx").write_bytes(data[:-3])
    with pytest.raises(ClovaError, match=r"y\.idx: .*truncated"):
        IndexedDataset(tmp_path / "y")


# ------------------------------------------------------------------ shard dirs


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, konlpy_files, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    tokenize_corpus(
        konlpy_files, tokenizer_dir, out, ShardConfig(shard_tokens=4000, valid_fraction=0.2, workers=1), show_progress=False
    )
    return out


def test_pipeline_shards_read_with_the_megatron_reader(shard_dir, tokenizer_dir):
    from clova_train.tokenizer.bpe import ClovaTokenizer

    tok = ClovaTokenizer.load(tokenizer_dir)
    man = read_manifest(shard_dir)
    assert man["dtype"] == "uint16" and man["dtype_code"] == 8
    for rec in man["shards"]:
        ours = IndexedDataset(shard_dir / rec["prefix"])
        theirs = megatron_read(shard_dir / rec["prefix"])
        assert len(theirs) == len(ours) == rec["documents"]
        assert all(np.array_equal(a, b) for a, b in zip(theirs, ours))
        assert all(d[-1] == tok.eod_id and tok.eod_id not in d[:-1] for d in theirs)


def test_open_split_in_manifest_order(shard_dir):
    man = read_manifest(shard_dir)
    for split in ("train", "valid"):
        dss = open_split(shard_dir, split)
        recs = [r for r in man["shards"] if r["split"] == split]
        assert [d.prefix for d in dss] == [str(shard_dir / r["prefix"]) for r in recs]
        assert sum(len(d) for d in dss) == man["split"][split]["documents"] > 0
    with pytest.raises(ClovaError, match="split must be one of"):
        open_split(shard_dir, "test")


def test_verify_passes_on_a_good_dir(shard_dir):
    s = verify_shard_dir(shard_dir)
    man = read_manifest(shard_dir)
    assert s["shards"] == len(man["shards"])
    assert s["train"]["tokens"] + s["valid"]["tokens"] == man["totals"]["tokens"]


@pytest.fixture
def damaged(shard_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    return copy


def test_verify_catches_a_truncated_shard(damaged):
    f = damaged / "train-00001.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ClovaError, match=r"train-00001\.bin: .*truncated"):
        verify_shard_dir(damaged)


def test_verify_catches_a_bit_flip(damaged):
    f = damaged / "train-00000.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(ClovaError, match=r"train-00000\.bin: sha256 differs"):
        verify_shard_dir(damaged)


def test_verify_checks_the_index_against_the_bin_beyond_hashes(damaged):
    """An .idx whose recorded hash was updated too (a buggy tool) is still caught by the structure checks."""
    idx = damaged / "train-00000.idx"
    raw = bytearray(idx.read_bytes())
    n = struct.unpack("<Q", raw[18:26])[0]
    ptr = 34 + 4 * n + 8 * (n - 1)  # last document's pointer
    raw[ptr : ptr + 8] = struct.pack("<q", 10**9)
    idx.write_bytes(bytes(raw))
    man = json.loads((damaged / "manifest.json").read_text())
    import hashlib

    for rec in man["shards"]:
        if rec["prefix"] == "train-00000":
            rec["idx_sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ClovaError, match=r"train-00000\.idx: pointers fall outside"):
        verify_shard_dir(damaged)


def test_verify_catches_a_missing_shard(damaged):
    (damaged / "valid-00000.idx").unlink()
    with pytest.raises(ClovaError, match=r"valid-00000\.idx: missing"):
        verify_shard_dir(damaged)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ClovaError, match="no manifest.json; not a shard dir"):
        read_manifest(tmp_path)
    (tmp_path / "progress.json").write_text("{}")
    with pytest.raises(ClovaError, match="unfinished `clova tokenize` run"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"shard_tokens": 0},
        {"valid_fraction": 1.0},
        {"valid_fraction": -0.1},
        {"min_chars": 10, "max_chars": 5},
        {"doc_sep": "para"},
        {"on_error": "ignore"},
        {"workers": -1},
        {"num_nodes": 2, "node_rank": 2},
    ],
)
def test_config_checks_itself(bad):
    with pytest.raises(ClovaError):
        ShardConfig(**bad)


def test_config_loads_strictly(tmp_path):
    from clova_train.core.config import load_json

    (tmp_path / "c.json").write_text(json.dumps({"shard_tokens": 123, "dedup": False}))
    assert load_json(ShardConfig, tmp_path / "c.json").shard_tokens == 123
    (tmp_path / "c.json").write_text(json.dumps({"shard_token": 123}))
    with pytest.raises(ClovaError, match="unknown key"):
        load_json(ShardConfig, tmp_path / "c.json")
