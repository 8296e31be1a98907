"""Token shards in Megatron-LM's mmap indexed dataset format, and the shard dir around them.

One shard is a pair of files sharing a prefix:

``prefix.idx``
    ``MMIDIDX\\x00\\x00`` (9 bytes), version 1 (``<Q``), dtype code (``<B``),
    number of sequences N (``<Q``), length of the document index (``<Q``,
    N + 1 here), then N sizes (int32, tokens per sequence), N pointers (int64,
    byte offset of each sequence in ``.bin``) and the document index (int64,
    ``0, 1, ..., N``: one sequence per document).
``prefix.bin``
    The tokens, uint16 (code 8) when every id fits, else int32 (code 4).

These are exactly the files Megatron-LM's and GPT-NeoX's ``MMapIndexedDataset``
read, so their tools work on our shards unchanged. Beside each pair we keep
``prefix.keys`` (one little-endian uint64 per document: the dedup key of its
text) so that per-node outputs can be merged with exact cross-node
deduplication without re-reading any text.

A shard dir is described by ``manifest.json`` (see :func:`read_manifest`);
:class:`IndexedDataset` gives zero-copy random access to one shard and
:func:`open_split` to all shards of a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clova_train.text.readers import check_read_options
from clova_train.core.errors import ClovaError
from clova_train.core.files import commit_file, file_sha256, tmp_name
from clova_train.shards.stamps import file_stamp, scan_bin

MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
# Megatron-LM's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
MANIFEST_FORMAT = "clova-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "valid")
KEY_DTYPE = np.dtype("<u8")


@dataclasses.dataclass
class ShardConfig:
    """How `clova tokenize` cleans, splits and shards a corpus. Flags override a JSON file."""

    shard_tokens: int = 1_000_000_000
    """Tokens per shard: a shard closes after the document that reaches this. 1B tokens is a 2 GB .bin at
    uint16 (4 GB at int32) and an .idx of about 12 bytes per document: the paper's 561B tokens make about
    560 train shards, so a rank's maps, directory listings and manifests stay in the hundreds."""
    valid_fraction: float = 0.01
    """Fraction of documents held out for validation, chosen by a stable hash of the text."""
    min_chars: int = 0
    """Skip documents shorter than this many characters after cleaning (0: keep all)."""
    max_chars: int = 4_000_000
    """A document longer than this (before cleaning) is bad input: an error, or a skip with --on-error skip."""
    dedup: bool = True
    """Drop exact duplicates (same cleaned text) across all inputs; the first occurrence is kept."""
    text_key: str = "text"
    """Field holding the text in jsonl, parquet and datasets inputs."""
    doc_sep: str = "line"
    """In .txt inputs, one document per line or per blank-line-separated block."""
    on_error: str = "raise"
    """raise: stop at the first bad document; skip: count it by reason and go on."""
    workers: int = 0
    """Tokenizing processes (0: all cores this process may use); never changes the output."""
    batch_chars: int = 1 << 18
    """Characters per tokenizer batch (a worker's part of an input is 4x that in bytes); trades memory for speed, never changes the output."""
    num_nodes: int = 1
    """Machines sharing the corpus; each takes a contiguous slice of the input files."""
    node_rank: int = 0
    """This machine's slice, 0 <= node_rank < num_nodes."""

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise ClovaError(f"shard_tokens must be >= 1, not {self.shard_tokens}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ClovaError(f"valid_fraction must be in [0, 1), not {self.valid_fraction}")
        if self.min_chars < 0:
            raise ClovaError(f"min_chars must be >= 0, not {self.min_chars}")
        if self.max_chars < max(1, self.min_chars):
            raise ClovaError(f"max_chars ({self.max_chars}) must be >= 1 and >= min_chars ({self.min_chars})")
        check_read_options(self.doc_sep, self.on_error, self.workers)
        if self.batch_chars < 1:
            raise ClovaError(f"batch_chars must be >= 1, not {self.batch_chars}")
        if self.num_nodes < 1:
            raise ClovaError(f"num_nodes must be >= 1, not {self.num_nodes}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ClovaError(f"node_rank must be in [0, {self.num_nodes}), not {self.node_rank}")

    @property
    def recorded_fields(self) -> dict:
        """The settings a manifest records: all but those that only change speed, so the
        manifest too is byte-identical for any worker count."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("workers", "batch_chars")}

    @property
    def output_fields(self) -> dict:
        """The settings that decide the output bytes (a resumed run must share them).

        on_error is not one: a run that completes under "raise" met no bad input,
        so an interrupted run may be resumed with --on-error skip."""
        return {k: v for k, v in self.recorded_fields.items() if k != "on_error"}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else int32 (as Megatron-LM chooses)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    return _CODE_OF[np.dtype(dtype)]


def prefix_files(prefix: str | Path) -> tuple[Path, Path, Path]:
    """(.bin, .idx, .keys) paths of a shard prefix."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), Path(p + ".keys")


# ------------------------------------------------------------------ writing


def write_index(path: Path, dtype, sizes: np.ndarray, pointers: np.ndarray) -> str:
    """Write a Megatron .idx (one sequence per document) atomically; return its sha256."""
    n = len(sizes)
    body = b"".join(
        [
            MAGIC,
            struct.pack("<Q", INDEX_VERSION),
            struct.pack("<B", dtype_code(dtype)),
            struct.pack("<Q", n),
            struct.pack("<Q", n + 1),
            np.asarray(sizes, dtype="<i4").tobytes(),
            np.asarray(pointers, dtype="<i8").tobytes(),
            np.arange(n + 1, dtype="<i8").tobytes(),
        ]
    )
    return write_bytes(path, body)


def write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` atomically; return its sha256."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    commit_file(tmp, path)
    return hashlib.sha256(data).hexdigest()


class IndexedDatasetWriter:
    """Writes one .bin/.idx pair; nothing is visible under the final names until :meth:`finalize`.

    >>> w = IndexedDatasetWriter("out/train-00000", np.uint16)
    >>> w.add_document([5, 6, 0]); info = w.finalize()
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # refuses a dtype Megatron has no code for
        self._bin, self._idx, _ = prefix_files(self.prefix)
        self._tmp = tmp_name(self._bin)
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._sizes: list[np.ndarray] = []
        self._tokens = 0
        self._documents = 0
        self._done = False

    @property
    def documents(self) -> int:
        return self._documents

    @property
    def tokens(self) -> int:
        return self._tokens

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (its ids, end-of-document token included)."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"ids outside the range of {self.dtype}: {arr.min()}..{arr.max()}")
        self.add_documents(arr.astype(self.dtype, copy=False), np.array([arr.size], dtype=np.int32))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        if self._done:
            raise ValueError(f"{self.prefix}: already finalized")
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        data = memoryview(tokens).cast("B")  # no copy of what may be a large batch
        self._f.write(data)
        self._sha.update(data)
        self._sizes.append(lengths)
        self._tokens += tokens.size
        self._documents += lengths.size

    def finalize(self) -> dict:
        """Write the .idx and move both files into place; return counts and hashes."""
        if self._done:
            raise ValueError(f"{self.prefix}: already finalized")
        self._done = True
        self._f.close()
        commit_file(self._tmp, self._bin)
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        # The .idx goes last: a shard whose .idx exists has its .bin complete.
        idx_sha = write_index(self._idx, self.dtype, sizes, pointers)
        return {
            "documents": self._documents,
            "tokens": self._tokens,
            "bin_bytes": self._tokens * self.dtype.itemsize,
            "bin_sha256": self._sha.hexdigest(),
            "idx_sha256": idx_sha,
        }

    def abort(self) -> None:
        """Drop the unfinished shard."""
        if not self._done:
            self._done = True
            self._f.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


# ------------------------------------------------------------------ reading


def _read_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    try:
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ClovaError(f"{idx_path}: cannot read ({e.strerror})") from None
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ClovaError(f"{idx_path}: not a Megatron mmap index (bad magic or truncated header)")
    (version,) = struct.unpack_from("<Q", head, len(MAGIC))
    (code,) = struct.unpack_from("<B", head, len(MAGIC) + 8)
    n, n_doc_idx = struct.unpack_from("<QQ", head, len(MAGIC) + 9)
    if version != INDEX_VERSION:
        raise ClovaError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
    if code not in DTYPE_CODES:
        raise ClovaError(f"{idx_path}: unknown dtype code {code}")
    return np.dtype(DTYPE_CODES[code]), n, n_doc_idx


class _OpenMaps:
    """The memory maps of the most recently used shards; older ones are closed.

    A map holds a file descriptor for as long as it lives, so thousands of
    shards mapped at once would pass the usual soft limit of 1,024 open files;
    shards are mapped on first use and at most ``limit`` stay mapped.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._maps: "OrderedDict[str, tuple]" = OrderedDict()

    def get(self, ds: "IndexedDataset") -> tuple:
        # By file identity, not by name: a shard rewritten under the same prefix is another shard.
        maps = self._maps.get(ds.identity)
        if maps is not None:
            self._maps.move_to_end(ds.identity)
            return maps
        maps = ds._map()
        self._maps[ds.identity] = maps
        while len(self._maps) > self.limit:
            self._maps.popitem(last=False)  # views still held elsewhere keep their map (and descriptor) alive
        return maps

    def drop(self, ds: "IndexedDataset") -> None:
        """Unmap ``ds`` now (a one-pass reader is done with it; a deleted file's space comes back)."""
        self._maps.pop(ds.identity, None)

    def clear(self) -> None:
        self._maps.clear()


OPEN_SHARDS = _OpenMaps(limit=128)
"""Shards kept mapped at once per process (two descriptors each: .idx and .bin)."""


def check_open_files(extra: int = 512) -> None:
    """Make sure this process may keep :data:`OPEN_SHARDS` mapped plus ``extra`` other files open.

    Raises the soft limit up to the hard one when that suffices (no privilege
    needed); otherwise a one-line error with the fix.
    """
    import resource

    need = 2 * OPEN_SHARDS.limit + extra
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise ClovaError(
        f"this process may open only {soft} files (hard limit {hard}) but needs about {need} "
        f"({OPEN_SHARDS.limit} shards mapped at once, two files each, plus {extra} for the rest); "
        f"run `ulimit -n {need}` before starting (a hard limit comes from limits.conf or the job scheduler)"
    )


class IndexedDataset:
    """Read-only, zero-copy view of one shard: ``ds[i]`` is document i's tokens (EOD included).

    Attributes ``sizes`` (int32), ``pointers`` (int64 byte offsets), ``doc_idx``
    (int64) and ``dtype`` mirror Megatron-LM's ``MMapIndexedDataset``. Opening
    reads the header only; the files are mapped on first access through
    :data:`OPEN_SHARDS`. ``tokens`` (from a verified manifest) spares reading
    every size to count them.
    """

    def __init__(self, prefix: str | Path, tokens: int | None = None):
        self.prefix = str(prefix)
        bin_path, idx_path, _ = prefix_files(prefix)
        self.dtype, n, n_doc_idx = _read_header(idx_path)
        expected = HEADER_BYTES + n * 4 + n * 8 + n_doc_idx * 8
        actual = idx_path.stat().st_size
        if actual != expected:
            raise ClovaError(
                f"{idx_path}: {actual} bytes but its header promises {expected} "
                f"({n} sequences); the file is truncated or corrupt"
            )
        if not bin_path.is_file():
            raise ClovaError(f"{bin_path}: missing (its index {idx_path.name} exists)")
        self._n, self._n_doc_idx, self._known_tokens = n, n_doc_idx, tokens
        b, i = bin_path.stat(), idx_path.stat()
        self.identity = (self.prefix, b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, i.st_ino, i.st_size, i.st_mtime_ns)

    def _map(self) -> tuple:
        bin_path, idx_path, _ = prefix_files(self.prefix)
        n = self._n
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=HEADER_BYTES)
        pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=HEADER_BYTES + 4 * n)
        doc_idx = np.frombuffer(idx, dtype="<i8", count=self._n_doc_idx, offset=HEADER_BYTES + 12 * n)
        if bin_path.stat().st_size == 0:  # mmap refuses empty files
            tokens = np.zeros(0, dtype=self.dtype)
        else:
            tokens = np.frombuffer(np.memmap(bin_path, dtype=np.uint8, mode="r"), dtype=self.dtype.newbyteorder("<"))
        return sizes, pointers, doc_idx, tokens

    @property
    def sizes(self) -> np.ndarray:
        return OPEN_SHARDS.get(self)[0]

    @property
    def pointers(self) -> np.ndarray:
        return OPEN_SHARDS.get(self)[1]

    @property
    def doc_idx(self) -> np.ndarray:
        return OPEN_SHARDS.get(self)[2]

    @property
    def _tokens(self) -> np.ndarray:
        return OPEN_SHARDS.get(self)[3]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of document ``i``, as a view into the mapped file."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        sizes, pointers, _, tokens = OPEN_SHARDS.get(self)
        base = int(pointers[i]) // self.dtype.itemsize
        end = base + int(sizes[i])
        start = min(base + offset, end)
        stop = end if length is None else min(start + length, end)
        return tokens[start:stop]

    @property
    def num_tokens(self) -> int:
        if self._known_tokens is not None:
            return self._known_tokens
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin, as one mapped array."""
        return self._tokens


# ------------------------------------------------------------------ shard dirs


def read_manifest(directory: str | Path) -> dict:
    """The manifest.json of a finished shard dir (single node or merged)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / PROGRESS).is_file():
            raise ClovaError(
                f"{directory}: an unfinished `clova tokenize` run (no {MANIFEST} yet); rerun the same command to finish it"
            )
        raise ClovaError(f"{directory}: no {MANIFEST}; not a shard dir (make one with `clova tokenize`)")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ClovaError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if man.get("format") != MANIFEST_FORMAT or man.get("format_version") != MANIFEST_VERSION:
        raise ClovaError(
            f"{path}: format {man.get('format')!r} version {man.get('format_version')!r}; "
            f"expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}"
        )
    return man



def open_split(directory: str | Path, split: str = "train") -> list[IndexedDataset]:
    """The shards of one split, in manifest order (merged dirs included)."""
    if split not in SPLITS:
        raise ClovaError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    directory = Path(directory)
    man = read_manifest(directory)
    return [IndexedDataset(directory / s["prefix"], tokens=s["tokens"]) for s in man["shards"] if s["split"] == split]


def _check_hash(path: Path, want: str | None, want_bytes: int | None = None, *, hashed: str | None = None) -> None:
    """Presence, size, and (``want`` given) the sha256, computed here unless ``hashed`` already."""
    if not path.is_file():
        raise ClovaError(f"{path}: missing (listed in the manifest); rerun `clova tokenize` to rebuild it")
    size = path.stat().st_size
    if want_bytes is not None and size != want_bytes:
        raise ClovaError(f"{path}: {size} bytes but the manifest says {want_bytes}; the file is truncated or was changed")
    if want is not None and (hashed or file_sha256(path)) != want:
        raise ClovaError(f"{path}: sha256 differs from the manifest; the file is corrupt or was changed")


def check_shard(prefix: Path, record: dict, *, eod_id: int | None, vocab_size: int | None) -> dict:
    """Check one shard's .idx against its .bin and both against the manifest, reading each file once;
    ClovaError naming the file, else the stamps of its files (see :func:`file_stamp`)."""
    bin_path, idx_path, keys_path = prefix_files(prefix)
    _check_hash(bin_path, None, record.get("bin_bytes"))  # presence and size before anything is read
    _check_hash(idx_path, record["idx_sha256"])
    stamps = {"idx": file_stamp(idx_path, record["idx_sha256"])}
    if record.get("keys_sha256"):
        _check_hash(keys_path, record["keys_sha256"], 8 * record["documents"])
        stamps["keys"] = file_stamp(keys_path, record["keys_sha256"])
    ds = IndexedDataset(prefix)
    try:
        return _check_mapped(ds, record, stamps, eod_id=eod_id, vocab_size=vocab_size)
    finally:
        OPEN_SHARDS.drop(ds)  # checked once; a training run maps it again when it needs it


def _check_mapped(ds: IndexedDataset, record: dict, stamps: dict, *, eod_id: int | None, vocab_size: int | None) -> dict:
    bin_path, idx_path, _ = prefix_files(ds.prefix)
    n = len(ds)
    bad = lambda what: ClovaError(f"{idx_path}: {what}")  # noqa: E731
    if record.get("dtype") and ds.dtype != np.dtype(record["dtype"]):
        raise bad(f"dtype {ds.dtype} but the manifest says {record['dtype']}")
    if n != record["documents"]:
        raise bad(f"{n} documents but the manifest says {record['documents']}")
    if not np.array_equal(ds.doc_idx, np.arange(n + 1)):
        raise bad("document index is not 0..N (one sequence per document expected)")
    if n and ds.sizes.min() < 1:
        raise bad("a document has no tokens (each must end with the end-of-document token)")
    if ds.num_tokens != record["tokens"]:
        raise bad(f"sizes sum to {ds.num_tokens} tokens but the manifest says {record['tokens']}")
    item = ds.dtype.itemsize
    bin_bytes = bin_path.stat().st_size
    ends = ds.pointers + ds.sizes.astype(np.int64) * item
    if n and (ds.pointers.min() < 0 or (ds.pointers % item).any() or ends.max() > bin_bytes):
        raise bad(f"pointers fall outside {bin_path.name} ({bin_bytes} bytes)")
    if n > 1 and (ds.pointers[1:] < ends[:-1]).any():
        raise bad("documents overlap or are out of order")
    if not record.get("view"):
        contiguous = n == 0 or (ds.pointers[0] == 0 and np.array_equal(ds.pointers[1:], ends[:-1]))
        if not contiguous or ds.num_tokens * item != bin_bytes:
            raise bad(f"sizes cover {ds.num_tokens * item} bytes but {bin_path.name} holds {bin_bytes}")
    sha, blocks, top, first_bad = scan_bin(bin_path, ds.dtype, (ends - item) // item, eod_id if n else None)
    _check_hash(bin_path, record["bin_sha256"], hashed=sha)
    if first_bad >= 0:
        raise bad(f"document {first_bad} does not end with the end-of-document token {eod_id}")
    if n and vocab_size is not None and top >= vocab_size:
        raise ClovaError(f"{bin_path}: token id {top} outside the vocabulary ({vocab_size})")
    stamps["bin"] = file_stamp(bin_path, sha, blocks=blocks)
    return stamps


def _check_one(args: tuple) -> dict:
    return check_shard(*args[:2], eod_id=args[2], vocab_size=args[3])


def verify_shard_dir(directory: str | Path, progress: bool = False, *, workers: int = 1, only: Sequence[str] | None = None) -> dict:
    """Re-hash every shard file and check every .idx against its .bin; a summary with each shard's file stamps
    (under "stamps", by prefix), or ClovaError. ``workers`` processes share the shards; ``only`` (prefixes)
    limits the file checks to those shards (the manifest's own totals are always checked)."""
    from clova_train.core.progress import progress_bar

    directory = Path(directory)
    man = read_manifest(directory)
    tok = man["tokenizer"]
    summary = {s: {"shards": 0, "documents": 0, "tokens": 0} for s in SPLITS}
    todo = [r for r in man["shards"] if only is None or r["prefix"] in set(only)]
    total_bytes = sum(s["bin_bytes"] for s in man["shards"])
    jobs = [(directory / r["prefix"], r, tok["eod_id"], tok["vocab_size"]) for r in todo]
    stamps = {}
    with progress_bar("verifying", sum(r["bin_bytes"] for r in todo), enabled=progress, unit="bytes") as advance:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
                for rec, st in zip(todo, pool.map(_check_one, jobs)):
                    stamps[rec["prefix"]] = st
                    advance(rec["bin_bytes"])
        else:
            for rec, job in zip(todo, jobs):
                stamps[rec["prefix"]] = _check_one(job)
                advance(rec["bin_bytes"])
    for rec in man["shards"]:
        part = summary[rec["split"]]
        part["shards"] += 1
        part["documents"] += rec["documents"]
        part["tokens"] += rec["tokens"]
    totals = man["totals"]
    for split in SPLITS:
        if summary[split]["documents"] != man["split"][split]["documents"]:
            raise ClovaError(
                f"{directory / MANIFEST}: {split} shards hold {summary[split]['documents']} documents "
                f"but the manifest's split says {man['split'][split]['documents']}"
            )
    written = summary["train"]["documents"] + summary["valid"]["documents"]
    if totals["documents_read"] != written + totals["documents_skipped"]:
        raise ClovaError(
            f"{directory / MANIFEST}: documents read ({totals['documents_read']}) != written ({written}) "
            f"+ skipped ({totals['documents_skipped']})"
        )
    return {
        "dir": str(directory),
        "shards": len(man["shards"]),
        "bytes": total_bytes,
        "tokenizer_hash": tok["hash"],
        **summary,
        "stamps": stamps,
    }
