"""`clova tokenize`: raw corpus -> cleaned, deduplicated, tokenized Megatron shards.

The main process reads every input in order, cleans each document (control
characters out, the tokenizer's Unicode normalisation, length limits), drops
exact duplicates, assigns train/valid by a stable hash of the text, and ships
batches to a pool of tokenizer processes. Results come back in submission
order and the main process writes them in that order, so the output depends
only on the document stream: the same bytes for any ``--workers``.

Shard boundaries are a function of that stream too (a shard closes after the
document that reaches ``shard_tokens``). ``progress.json`` records every
finished shard; a rerun with the same arguments verifies those shards by hash,
re-reads the inputs (cheap next to tokenizing, and it rebuilds the dedup
state exactly) and tokenizes only the documents not yet in a finished shard.

Many machines: ``num_nodes``/``node_rank`` pick a contiguous, byte-balanced
slice of the input files; :func:`merge_shard_dirs` joins the node dirs into
one manifest that points at the node shards by relative path, without
copying tokens. Because slices are contiguous and merged in rank order, the
merged dataset holds the same documents in the same order as a single-node
run: cross-node duplicates are dropped at merge time by writing, for the few
affected shards only, a new .idx that skips them next to a symlink to the
node's .bin.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import time
import unicodedata
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from clova_train import __version__
from clova_train.text.readers import (
    Document,
    SkipCounts,
    check_inputs,
    input_size,
    iter_documents,
    strip_control,
)
from clova_train.core.errors import ClovaError
from clova_train.core.progress import progress_bar
from clova_train.shards.format import (
    KEY_DTYPE,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PROGRESS,
    SPLITS,
    IndexedDataset,
    IndexedDatasetWriter,
    ShardConfig,
    check_shard,
    dtype_code,
    dtype_for_vocab,
    is_tmp_name,
    prefix_files,
    read_manifest,
    tmp_name,
    verify_shard_dir,
    write_bytes,
    write_index,
)
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.core.files import atomic_write_json, file_sha256, fsync_path

PROGRESS_VERSION = 1
# Test hook: the process dies (os._exit, no cleanup) right after committing
# this many shards, as a killed job would.
EXIT_AFTER_SHARDS_ENV = "CLOVA_TEST_EXIT_AFTER_SHARDS"
TRAIN, VALID = 0, 1
SPLIT_METHOD = "valid if the last 8 bytes of blake2b-128(cleaned UTF-8 text) < valid_fraction * 2**64"
DEDUP_METHOD = "exact: the first 8 bytes of blake2b-128(cleaned UTF-8 text); the first occurrence is kept"


# ------------------------------------------------------------------ slices of the input


def node_files(sizes: Sequence[int], num_nodes: int, node_rank: int) -> list[int]:
    """Indices of the inputs node ``node_rank`` owns: contiguous, balanced by bytes.

    A file belongs to the node whose share of the byte range holds the file's
    midpoint, so every node sees a deterministic, disjoint run of files and
    the runs in rank order are the inputs in order.
    """
    n = len(sizes)
    total = sum(sizes)
    owners = []
    before = 0
    for i, size in enumerate(sizes):
        if total:
            owner = (2 * before + size) * num_nodes // (2 * total)
        else:
            owner = i * num_nodes // n
        owners.append(min(owner, num_nodes - 1))
        before += size
    return [i for i, o in enumerate(owners) if o == node_rank]


def slurm_node_slice(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(num_nodes, node_rank) of a Slurm job array task, or None outside one."""
    count, task = environ.get("SLURM_ARRAY_TASK_COUNT"), environ.get("SLURM_ARRAY_TASK_ID")
    if not count or task is None:
        return None
    num, rank = int(count), int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    if not 0 <= rank < num:
        raise ClovaError(
            f"Slurm array task {task} is not rank 0..{num - 1} of {num} tasks; "
            "use a contiguous --array=0-N or pass --num-nodes and --node-rank"
        )
    return num, rank


def resolve_workers(workers: int) -> int:
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))  # honours Slurm's and taskset's CPU masks
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------ dedup


class KeySet:
    """Exact set of 64-bit keys at about 8 bytes each (a Python set costs ~9x more).

    Keys live in sorted runs whose sizes halve from first to last, merged like
    a binary counter, so membership costs O(log^2 n) per key, vectorised per batch.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Add ``keys``; True where a key was not seen before (first occurrence within the batch)."""
        keys = np.asarray(keys, dtype=np.uint64)
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        new[np.unique(keys, return_index=True)[1]] = True
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            new &= run[pos] != keys
        fresh = np.sort(keys[new])
        if len(fresh):
            self._runs.append(fresh)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([a, b])))
        return new


def digest(data: bytes) -> bytes:
    """16 bytes of a cleaned text's UTF-8: dedup key (first 8) and split draw (last 8), little-endian."""
    return hashlib.blake2b(data, digest_size=16).digest()


def is_valid(text: str, valid_fraction: float) -> bool:
    """Whether a cleaned text lands in the validation split (the rule the pipeline applies)."""
    draw = int.from_bytes(digest(text.encode("utf-8"))[8:], "little")
    return draw < int(valid_fraction * 2**64)


# ------------------------------------------------------------------ workers

_worker_tok: ClovaTokenizer | None = None


def _init_worker(tokenizer_dir: str, one_thread: bool) -> None:
    global _worker_tok
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if one_thread:
        # Many worker processes already fill the cores; Rust threads inside each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = ClovaTokenizer.load(tokenizer_dir)


def _encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of every text plus the end-of-document token, concatenated, and per-document lengths."""
    tok = _worker_tok
    ids = tok.encode_batch(texts)
    eod = tok.eod_id
    for x in ids:
        x.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


class _Batch:
    """Documents on their way to a worker, and what the writer needs to know about each."""

    __slots__ = ("texts", "split", "keys", "source")

    def __init__(self, texts: list[str], split: np.ndarray, keys: np.ndarray, source: np.ndarray):
        self.texts, self.split, self.keys, self.source = texts, split, keys, source


def _ordered_results(pool, batches: Iterator[_Batch], dtype: str, window: int):
    """Like ``pool.imap`` (ordered) but with at most ``window`` batches in flight, so memory stays bounded."""
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(_encode, (batch.texts, dtype))))
        batch.texts = None  # the pool holds them until sent; keeping them here would double the memory
        if len(pending) >= window:
            b, r = pending.popleft()
            yield b, r.get()
    while pending:
        b, r = pending.popleft()
        yield b, r.get()


# ------------------------------------------------------------------ reading and cleaning


class _InputStats:
    """Per-input bookkeeping; ``read == written + skipped`` is checked at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.reader_skips = SkipCounts()
        self.clean_skips = SkipCounts()
        self.yielded = 0
        self.written = [0, 0]
        self.sha256: Future | None = None

    def record(self) -> dict:
        skips = SkipCounts()
        skips.merge(self.reader_skips)
        skips.merge(self.clean_skips)
        read = self.yielded + self.reader_skips.total
        written = sum(self.written)
        if read != written + skips.total:  # an internal invariant, not a user error
            raise AssertionError(f"{self.path}: read {read} != written {written} + skipped {skips.total}")
        return {
            "path": str(self.path),
            "bytes": input_size(self.path),
            "sha256": self.sha256.result(),
            "documents_read": read,
            "documents_written": {"train": self.written[TRAIN], "valid": self.written[VALID]},
            "documents_skipped": skips.total,
            "skipped": skips.to_dict(),
        }


class _DocumentStream:
    """Reads, cleans, dedups and splits the inputs in order, in batches for the workers.

    ``skip_first[s]`` documents of split s are counted but not shipped: they
    are already in finished shards of an interrupted run.
    """

    def __init__(self, paths: list[Path], cfg: ShardConfig, normalization: str, skip_first: list[int], io: ThreadPoolExecutor):
        self.cfg = cfg
        self.norm = normalization
        self.inputs = [_InputStats(p) for p in paths]
        self.keys = KeySet() if cfg.dedup else None
        self.skip_first = list(skip_first)
        self.seen = [0, 0]
        self.io = io
        self.threshold = np.uint64(int(cfg.valid_fraction * 2**64))

    def _documents(self, advance) -> Iterator[tuple[int, str, str, bytes]]:
        cfg = self.cfg
        for src, stats in enumerate(self.inputs):
            path = stats.path
            stats.sha256 = self.io.submit(file_sha256, path)
            docs = iter_documents(
                path, text_key=cfg.text_key, doc_sep=cfg.doc_sep, on_error=cfg.on_error, skips=stats.reader_skips
            )
            size, shown = input_size(path), 0
            for doc in docs:
                stats.yielded += 1
                text = self._clean(doc, stats)
                if text is None:
                    continue
                data = text.encode("utf-8")
                if shown < size:
                    step = min(len(data) + 1, size - shown)
                    shown += step
                    advance(step)
                yield src, doc.where, text, data
            advance(size - shown)

    def _clean(self, doc: Document, stats: _InputStats) -> str | None:
        cfg = self.cfg
        if len(doc.text) > cfg.max_chars:
            if cfg.on_error == "raise":
                raise ClovaError(
                    f"{stats.path}: {doc.where}: document of {len(doc.text):,} characters is over --max-chars "
                    f"{cfg.max_chars:,} (a missing line break or binary data?); raise the limit or pass --on-error skip"
                )
            stats.clean_skips.add("too_long", f"{stats.path}:{doc.where}")
            return None
        text = strip_control(doc.text)
        if self.norm != "none":
            text = unicodedata.normalize(self.norm, text)
        if not text or text.isspace():
            stats.clean_skips.add("empty_after_cleaning", f"{stats.path}:{doc.where}")
            return None
        if len(text) < cfg.min_chars:
            stats.clean_skips.add("too_short", f"{stats.path}:{doc.where}")
            return None
        return text

    def batches(self, advance) -> Iterator[_Batch]:
        texts: list[str] = []
        wheres: list[str] = []
        digests: list[bytes] = []
        sources: list[int] = []
        chars = 0
        for src, where, text, data in self._documents(advance):
            texts.append(text)
            wheres.append(where)
            digests.append(digest(data))
            sources.append(src)
            chars += len(text)
            if chars >= self.cfg.batch_chars:
                batch = self._finish(texts, wheres, digests, sources)
                if batch is not None:
                    yield batch
                texts, wheres, digests, sources, chars = [], [], [], [], 0
        if texts:
            batch = self._finish(texts, wheres, digests, sources)
            if batch is not None:
                yield batch

    def _finish(self, texts: list[str], wheres: list[str], digests: list[bytes], sources: list[int]) -> _Batch | None:
        words = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)  # see digest()
        keys, draws = words[:, 0], words[:, 1]
        src = np.asarray(sources, dtype=np.int32)
        keep = self.keys.add_new(keys) if self.keys is not None else np.ones(len(texts), dtype=bool)
        for i in np.flatnonzero(~keep):
            stats = self.inputs[src[i]]
            stats.clean_skips.add("duplicate", f"{stats.path}:{wheres[i]}")
        split = np.where(draws < self.threshold, VALID, TRAIN).astype(np.int8)
        ship = keep.copy()
        for s in (TRAIN, VALID):
            mine = keep & (split == s)
            order = self.seen[s] + np.cumsum(mine) - 1  # position of each document within its split
            ship &= ~(mine & (order < self.skip_first[s]))
            self.seen[s] += int(mine.sum())
            for i, n in zip(*np.unique(src[mine], return_counts=True)):
                self.inputs[i].written[s] += int(n)
        if not ship.any():
            return None
        idx = np.flatnonzero(ship)
        return _Batch([texts[i] for i in idx], split[idx], keys[idx].copy(), src[idx])


# ------------------------------------------------------------------ writing


class _ShardSeries:
    """The shards of one split, in order; a shard closes after the document that reaches shard_tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, first_index: int, on_close):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_tokens = shard_tokens
        self.index = first_index
        self.on_close = on_close
        self._w: IndexedDatasetWriter | None = None
        self._keys: list[np.ndarray] = []
        self._sources: list[list[int]] = []

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    def add(self, tokens: np.ndarray, lengths: np.ndarray, keys: np.ndarray, sources: np.ndarray) -> None:
        while len(lengths):
            if self._w is None:
                self._w = IndexedDatasetWriter(self.out_dir / self.name, self.dtype)
            ends = np.cumsum(lengths, dtype=np.int64)
            take = min(int(np.searchsorted(ends, self.shard_tokens - self._w.tokens)) + 1, len(lengths))
            n_tok = int(ends[take - 1])
            self._w.add_documents(tokens[:n_tok], lengths[:take])
            self._keys.append(keys[:take])
            self._add_sources(sources[:take])
            tokens, lengths, keys, sources = tokens[n_tok:], lengths[take:], keys[take:], sources[take:]
            if self._w.tokens >= self.shard_tokens:
                self.close()

    def _add_sources(self, sources: np.ndarray) -> None:
        cuts = np.flatnonzero(np.diff(sources)) + 1
        for run in np.split(sources, cuts):
            src = int(run[0])
            if self._sources and self._sources[-1][0] == src:
                self._sources[-1][1] += len(run)
            else:
                self._sources.append([src, len(run)])

    def close(self) -> None:
        """Finish the open shard, if any, and report it."""
        if self._w is None:
            return
        info = self._w.finalize()
        keys = np.concatenate(self._keys).astype(KEY_DTYPE)
        keys_sha = write_bytes(prefix_files(self.out_dir / self.name)[2], keys.tobytes())
        record = {
            "prefix": self.name,
            "split": self.split,
            **info,
            "keys_sha256": keys_sha,
            "dtype": self.dtype.name,
            "sources": self._sources,
        }
        self._w, self._keys, self._sources = None, [], []
        self.index += 1
        self.on_close(record)

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None


class _Progress:
    """progress.json: the settings and every finished shard, committed atomically after each shard."""

    def __init__(self, out_dir: Path, state: dict):
        self.path = out_dir / PROGRESS
        self.out_dir = out_dir
        self.state = state
        self.committed = 0
        self.exit_after = int(os.environ.get(EXIT_AFTER_SHARDS_ENV, "0") or 0)

    def save(self) -> None:
        atomic_write_json(self.path, self.state)
        fsync_path(self.out_dir)

    def shard_done(self, record: dict) -> None:
        self.state["shards"].append(record)
        self.save()
        self.committed += 1
        if self.exit_after and self.committed >= self.exit_after:
            os._exit(17)


def _fingerprint(cfg: ShardConfig, tok: ClovaTokenizer, paths: list[Path], sizes: list[int]) -> dict:
    return {
        "config": cfg.output_fields,
        "tokenizer_hash": tok.hash,
        "inputs": [[str(p.resolve()), s] for p, s in zip(paths, sizes)],
    }


def _input_stat(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4]) or "inputs"


def _is_ours(name: str) -> bool:
    stem, _, ext = name.rpartition(".")
    return is_tmp_name(name) or (ext in ("bin", "idx", "keys") and stem.split("-")[0] in SPLITS)


def _prepare_out_dir(out_dir: Path, fingerprint: dict, stats: list) -> tuple[dict | None, list[dict]]:
    """(finished manifest or None, shards kept from an interrupted run); creates or cleans the dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ClovaError(f"{out_dir}: is a file; --out must be a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return None, []
    if (out_dir / MANIFEST).is_file():
        man = read_manifest(out_dir)
        if man.get("fingerprint") != fingerprint:
            diff = _differences(man.get("fingerprint", {}).get("config", {}), fingerprint["config"])
            raise ClovaError(
                f"{out_dir}: already holds shards made with other inputs or settings ({diff}); choose another --out"
            )
        return man, []
    if not (out_dir / PROGRESS).is_file():
        raise ClovaError(f"{out_dir}: exists, is not empty and is not a shard dir; choose another --out")
    state = json.loads((out_dir / PROGRESS).read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        diff = _differences(state.get("fingerprint", {}).get("config", {}), fingerprint["config"])
        raise ClovaError(
            f"{out_dir}: holds an interrupted run with other inputs or settings ({diff}); "
            "rerun it with the same arguments to resume, or choose another --out"
        )
    for old, new in zip(state.get("input_stats", []), stats):
        if old != new:
            raise ClovaError(
                f"{new[0]}: changed since the interrupted run in {out_dir} (size or modification time); "
                f"its documents may already be in finished shards: delete {out_dir} and start over"
            )
    kept: list[dict] = []
    broken: set[str] = set()
    tok = state["tokenizer"]
    for rec in state["shards"]:
        if rec["split"] in broken:
            continue
        try:
            check_shard(out_dir / rec["prefix"], rec, eod_id=tok["eod_id"], vocab_size=tok["vocab_size"])
            kept.append(rec)
        except ClovaError:
            broken.add(rec["split"])  # redo this shard and everything after it in its split
    keep_names = {f.name for rec in kept for f in prefix_files(out_dir / rec["prefix"])}
    for f in out_dir.iterdir():
        if f.name not in keep_names and _is_ours(f.name):
            f.unlink()
    return None, kept


def tokenize_corpus(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    cfg: ShardConfig,
    *,
    show_progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` (this node's slice) into a shard dir; resume an interrupted run; return a report."""
    t0 = time.perf_counter()
    all_paths = check_inputs(list(inputs))
    all_sizes = [input_size(p) for p in all_paths]
    paths = [all_paths[i] for i in node_files(all_sizes, cfg.num_nodes, cfg.node_rank)]
    tok = ClovaTokenizer.load(tokenizer_dir)
    dtype = dtype_for_vocab(tok.vocab_size)
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(cfg, tok, all_paths, all_sizes)
    stats = [_input_stat(p) for p in paths]
    done, kept = _prepare_out_dir(out_dir, fingerprint, stats)
    if done is not None:
        verify_shard_dir(out_dir)  # "nothing to do" must also mean "nothing lost"
        return _report(done, out_dir, time.perf_counter() - t0, workers=0, resumed=len(done["shards"]), complete=True)

    tokenizer_info = {
        "path": str(Path(tokenizer_dir).resolve()),
        "hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "normalization": tok.normalization,
    }
    progress = _Progress(
        out_dir,
        {
            "version": PROGRESS_VERSION,
            "fingerprint": fingerprint,
            "input_stats": stats,
            "tokenizer": tokenizer_info,
            "shards": list(kept),
        },
    )
    progress.save()
    skip_first = [sum(r["documents"] for r in kept if r["split"] == s) for s in SPLITS]
    series = [
        _ShardSeries(out_dir, s, dtype, cfg.shard_tokens, sum(r["split"] == s for r in kept), progress.shard_done)
        for s in SPLITS
    ]
    workers = resolve_workers(cfg.workers)
    # fork: workers start before any thread exists here, and start in milliseconds.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path), workers > 1)) as pool, ThreadPoolExecutor(
        2
    ) as io:
        stream = _DocumentStream(paths, cfg, tok.normalization, skip_first, io)
        try:
            with progress_bar("tokenizing", sum(input_size(p) for p in paths), enabled=show_progress, unit="bytes") as advance:
                for batch, (tokens, lengths) in _ordered_results(pool, stream.batches(advance), dtype.name, 2 * workers + 2):
                    for s, shards in enumerate(series):
                        mine = batch.split == s
                        if mine.all():
                            shards.add(tokens, lengths, batch.keys, batch.source)
                        elif mine.any():
                            shards.add(tokens[np.repeat(mine, lengths)], lengths[mine], batch.keys[mine], batch.source[mine])
            for shards in series:
                shards.close()
        except BaseException:
            for shards in series:
                shards.abort()
            raise
        input_records = [s.record() for s in stream.inputs]

    manifest = _manifest(cfg, tokenizer_info, dtype, fingerprint, input_records, progress.state["shards"])
    manifest["node"] = {"num_nodes": cfg.num_nodes, "node_rank": cfg.node_rank, "input_files_total": len(all_paths)}
    atomic_write_json(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink()
    fsync_path(out_dir)
    return _report(manifest, out_dir, time.perf_counter() - t0, workers=workers, resumed=len(kept), complete=False)


def _manifest(cfg: ShardConfig, tokenizer: dict, dtype: np.dtype, fingerprint: dict, inputs: list, shards: list) -> dict:
    # Train and valid shards finish interleaved in an order that depends on batching;
    # listing them split by split keeps the manifest identical for any --workers.
    shards = sorted(shards, key=lambda r: SPLITS.index(r["split"]))
    skipped = SkipCounts()
    for rec in inputs:
        skipped.merge(_skips_from_dict(rec["skipped"]))
    split = {"valid_fraction": cfg.valid_fraction, "method": SPLIT_METHOD}
    for s in SPLITS:
        mine = [r for r in shards if r["split"] == s]
        split[s] = {
            "shards": len(mine),
            "documents": sum(r["documents"] for r in mine),
            "tokens": sum(r["tokens"] for r in mine),
        }
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created_by": f"clova-train {__version__}: clova tokenize",
        "tokenizer": tokenizer,
        "dtype": dtype.name,
        "dtype_code": dtype_code(dtype),
        "layout": "Megatron-LM MMapIndexedDataset: prefix.bin + prefix.idx, one sequence per document, "
        "each ending with eod_id; prefix.keys holds the dedup key (<u8) of each document",
        "config": cfg.recorded_fields,
        "fingerprint": fingerprint,
        "dedup": {"enabled": cfg.dedup, "method": DEDUP_METHOD},
        "split": split,
        "inputs": inputs,
        "shards": shards,
        "totals": {
            "input_files": len(inputs),
            "input_bytes": sum(r["bytes"] for r in inputs),
            "documents_read": sum(r["documents_read"] for r in inputs),
            "documents_written": split["train"]["documents"] + split["valid"]["documents"],
            "documents_skipped": skipped.total,
            "tokens": split["train"]["tokens"] + split["valid"]["tokens"],
            "shards": len(shards),
        },
        "skipped": skipped.to_dict(),
    }


def _skips_from_dict(d: dict) -> SkipCounts:
    s = SkipCounts()
    for reason, n in d["by_reason"].items():
        s.counts[reason] += n
        s.examples[reason] = list(d["examples"].get(reason, []))
    return s


def _report(manifest: dict, out_dir: Path, seconds: float, *, workers: int, resumed: int, complete: bool) -> dict:
    t = manifest["totals"]
    return {
        "out": str(out_dir),
        "already_complete": complete,
        "resumed_shards": resumed,
        "workers": workers,
        "seconds": seconds,
        "mb_per_s": t["input_bytes"] / 1e6 / seconds if seconds > 0 else 0.0,
        "docs_per_s": t["documents_read"] / seconds if seconds > 0 else 0.0,
        "split": manifest["split"],
        "skipped": manifest["skipped"],
        **t,
    }


# ------------------------------------------------------------------ merge


def merge_shard_dirs(dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Join per-node shard dirs into one dataset in ``out_dir`` without copying tokens.

    The merged manifest points at node shards by relative path. Documents that
    duplicate one in a lower-ranked node are dropped (when dedup was on) by a
    new .idx in ``out_dir`` that skips them, beside a relative symlink to the
    node's .bin; the result equals a single-node run in content and order.
    """
    if not dirs:
        raise ClovaError("no shard dirs given; pass the per-node output dirs of `clova tokenize`")
    out_dir = Path(out_dir)
    nodes = []
    for d in dirs:
        d = Path(d)
        man = read_manifest(d)
        if "node_rank" not in man.get("node", {}):
            raise ClovaError(f"{d}: is itself a merged dir; merge the per-node dirs instead")
        nodes.append((d, man))
    nodes.sort(key=lambda dm: dm[1]["node"]["node_rank"])
    first = nodes[0][1]
    k = first["node"]["num_nodes"]
    for d, man in nodes:
        if man["tokenizer"]["hash"] != first["tokenizer"]["hash"]:
            raise ClovaError(f"{d}: made with another tokenizer than {nodes[0][0]}; merge dirs of one run only")
        if _without_rank(man["fingerprint"]) != _without_rank(first["fingerprint"]):
            raise ClovaError(f"{d}: made with other inputs or settings than {nodes[0][0]}; merge dirs of one run only")
    ranks = [man["node"]["node_rank"] for _, man in nodes]
    if ranks != list(range(k)):
        missing = sorted(set(range(k)) - set(ranks))
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ClovaError(
            f"the run had {k} nodes; "
            + (f"missing node rank(s) {missing}" if missing else f"node rank(s) {dup} given twice")
            + "; pass every node's dir exactly once"
        )
    resolved_out = out_dir.resolve()
    if any(Path(d).resolve() == resolved_out for d, _ in nodes):
        raise ClovaError(f"{out_dir}: is one of the node dirs; choose another --out")
    _prepare_merge_dir(out_dir)

    dedup = first["config"]["dedup"]
    seen = KeySet()
    inputs: list[dict] = []
    shards: list[dict] = []
    cross = 0
    for d, man in nodes:
        offset = len(inputs)
        node_inputs = [dict(r, skipped=_skips_from_dict(r["skipped"]), documents_written=dict(r["documents_written"])) for r in man["inputs"]]
        for rec in man["shards"]:
            prefix = d / rec["prefix"]
            keys = _read_keys(prefix, rec, d)
            keep = seen.add_new(keys) if dedup else np.ones(len(keys), dtype=bool)
            per_doc_src = np.repeat([s for s, _ in rec["sources"]], [n for _, n in rec["sources"]])
            for i in np.flatnonzero(~keep):
                r = node_inputs[per_doc_src[i]]
                r["skipped"].add("duplicate", f"{r['path']} (across nodes; {rec['prefix']} document {i})")
                r["documents_written"][rec["split"]] -= 1
            cross += int((~keep).sum())
            if not keep.any():
                continue
            rel = os.path.relpath(prefix.resolve(), resolved_out)
            if keep.all():
                new = dict(rec, prefix=rel)
            else:
                new = _write_view(out_dir, f"n{man['node']['node_rank']:03d}-{rec['prefix']}", prefix, rec, keep, per_doc_src)
                new["view_of"] = rel
            new["sources"] = [[s + offset, n] for s, n in new["sources"]]
            shards.append(new)
        for r in node_inputs:
            r["skipped"] = r["skipped"].to_dict()
            r["documents_skipped"] = r["skipped"]["total"]
        inputs.extend(node_inputs)

    cfg = ShardConfig(**dict(first["config"], node_rank=0))
    manifest = _manifest(
        cfg, first["tokenizer"], np.dtype(first["dtype"]), _without_rank(first["fingerprint"]), inputs, shards
    )
    manifest["config"]["node_rank"] = None
    manifest["node"] = {
        "num_nodes": k,
        "merged_from": [
            {"dir": os.path.relpath(d.resolve(), resolved_out), "node_rank": m["node"]["node_rank"], "manifest_sha256": file_sha256(d / MANIFEST)}
            for d, m in nodes
        ],
        "cross_node_duplicates": cross,
        "layout": "shard prefixes are relative to this dir; nX-*.idx files skip cross-node duplicates and "
        "sit beside a relative symlink to the node's .bin",
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    fsync_path(out_dir)
    return _report(manifest, out_dir, 0.0, workers=0, resumed=0, complete=False)


def _read_keys(prefix: Path, rec: dict, node_dir: Path) -> np.ndarray:
    path = prefix_files(prefix)[2]
    size = path.stat().st_size if path.is_file() else -1
    if size != 8 * rec["documents"]:
        raise ClovaError(
            f"{path}: missing or not {rec['documents']} dedup keys; check the node dir with `clova shards verify {node_dir}`"
        )
    return np.fromfile(path, dtype=KEY_DTYPE)


def _without_rank(fingerprint: dict) -> dict:
    return {**fingerprint, "config": {**fingerprint["config"], "node_rank": None}}


def _prepare_merge_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        man = out_dir / MANIFEST
        merged = man.is_file() and "merged_from" in json.loads(man.read_text(encoding="utf-8")).get("node", {})
        if not merged:
            raise ClovaError(f"{out_dir}: exists, is not empty and is not a merged shard dir; choose another --out")
        man.unlink()  # a re-merge replaces the old one
        for f in out_dir.iterdir():
            if _VIEW_NAME.fullmatch(f.name) or is_tmp_name(f.name):
                f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


_VIEW_NAME = re.compile(r"n\d{3,}-(train|valid)-\d{5,}\.(bin|idx|keys)")


def _write_view(out_dir: Path, name: str, prefix: Path, rec: dict, keep: np.ndarray, per_doc_src: np.ndarray) -> dict:
    """A shard holding only the kept documents of ``prefix``: new .idx and .keys, symlinked .bin."""
    ds = IndexedDataset(prefix)
    bin_path, idx_path, keys_path = prefix_files(out_dir / name)
    link = tmp_name(bin_path)
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(prefix_files(prefix)[0].resolve(), out_dir.resolve()), link)
    os.replace(link, bin_path)
    sizes, pointers = ds.sizes[keep], ds.pointers[keep]
    idx_sha = write_index(idx_path, ds.dtype, sizes, pointers)
    keys = _read_keys(prefix, rec, prefix.parent)[keep]
    keys_sha = write_bytes(keys_path, keys.tobytes())
    src = per_doc_src[keep]
    cuts = np.flatnonzero(np.diff(src)) + 1
    return dict(
        rec,
        prefix=name,
        view=True,
        documents=int(keep.sum()),
        tokens=int(sizes.sum(dtype=np.int64)),
        idx_sha256=idx_sha,
        keys_sha256=keys_sha,
        sources=[[int(run[0]), len(run)] for run in np.split(src, cuts)],
    )
