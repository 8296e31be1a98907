"""`clova tokenize`: raw corpus -> cleaned, deduplicated, tokenized Megatron shards.

Workers read their own parts of the inputs (byte ranges of plain text and
jsonl files cut at document boundaries, whole files otherwise; see parts.py),
clean each document (control characters out, the tokenizer's Unicode
normalisation, length limits), hash and encode it. The main process never
reads the inputs: it takes the parts' results in input order, drops exact
duplicates by key, assigns train/valid by the same hash and writes shards in
that order, so the output depends only on the document stream: the same bytes
for any ``--workers``.

Shard boundaries are a function of that stream too (a shard closes after the
document that reaches ``shard_tokens``). ``progress.json`` records every
finished shard; a rerun with the same arguments verifies those shards by hash,
re-reads and hashes the inputs (cheap next to tokenizing, and it rebuilds the
dedup state exactly) and tokenizes only the parts that reach past the
finished shards.

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

import json
import multiprocessing as mp
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from clova_train.shards.keys import KeySet
from clova_train.shards.manifest import build_manifest, report
from clova_train.shards import parts
from clova_train.text.readers import SkipCounts, Span, check_inputs, input_size
from clova_train.core.errors import ClovaError
from clova_train.core.progress import progress_bar
from clova_train.shards.format import KEY_DTYPE, MANIFEST, PROGRESS, SPLITS, IndexedDatasetWriter, ShardConfig, check_shard, dtype_for_vocab, prefix_files, read_manifest, verify_shard_dir, write_bytes
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.core.files import atomic_write_json, file_sha256, fsync_path, is_disk_full, is_tmp_name
from clova_train.core.lock import LOCK_FILE, dir_lock
from clova_train.core.signals import Interrupted, signal_name, stop_on_sigterm
from clova_train.shards.guard import check_usable, drop_unrecorded, note, worker_pool

PROGRESS_VERSION = 1
# Test hook: the process dies (os._exit, no cleanup) right after committing
# this many shards, as a killed job would.
EXIT_AFTER_SHARDS_ENV = "CLOVA_TEST_EXIT_AFTER_SHARDS"
TRAIN, VALID = 0, 1


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


# ------------------------------------------------------------------ reading, in the workers


def _ordered(pool, tasks, window: int):
    """Like ``pool.imap`` (ordered) over (function, args, tag) but with at most ``window`` tasks in flight,
    so memory stays bounded; yields (tag, args, result)."""
    pending: deque = deque()
    for fn, args, tag in tasks:
        pending.append((tag, args, pool.apply_async(fn, args)))
        if len(pending) >= window:
            t, a, r = pending.popleft()
            yield t, a, r.get()
    while pending:
        t, a, r = pending.popleft()
        yield t, a, r.get()


def _parts(pool, paths: list[Path], window: int) -> Iterator[tuple[int, str, Span | None]]:
    """(input index, path, span) of every part in input order; spans carry the lines before them.
    Cutting and line counting run in the workers: the main process never reads the inputs."""
    for src, _, ranges in _ordered(pool, ((parts.plan, (str(p),), i) for i, p in enumerate(paths)), window):
        path = str(paths[src])
        if len(ranges) == 1:
            yield src, path, None  # the whole input, in any format
            continue
        before = 0
        counts = ((parts.lines_in, (path, a, b), (a, b)) for a, b in ranges)
        for (a, b), _, n in _ordered(pool, counts, window):
            yield src, path, (a, b, before)
            before += n


class _InputStats:
    """Per-input bookkeeping; ``read == written + skipped`` is checked at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.reader_skips = SkipCounts()
        self.clean_skips = SkipCounts()
        self.yielded = 0
        self.written = [0, 0]
        self.sha256 = None  # the pool's AsyncResult

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
            "sha256": self.sha256.get(),
            "documents_read": read,
            "documents_written": {"train": self.written[TRAIN], "valid": self.written[VALID]},
            "documents_skipped": skips.total,
            "skipped": skips.to_dict(),
        }


class _DocumentStream:
    """The parts' results in input order, deduplicated and split, as per-split batches for the shard writers.

    ``skip_first[s]`` documents of split s are counted but not written: they are already in finished
    shards of an interrupted run, so parts before them are read and hashed but not encoded (one that
    straddles the boundary is encoded on a second pass).
    """

    def __init__(self, paths: list[Path], cfg: ShardConfig, skip_first: list[int]):
        self.cfg = cfg
        self.inputs = [_InputStats(p) for p in paths]
        self.keys = KeySet() if cfg.dedup else None
        self.skip_first = list(skip_first)
        self.seen = [0, 0]

    def _resumed(self) -> bool:
        return any(seen < skip for seen, skip in zip(self.seen, self.skip_first))

    def batches(self, pool, dtype: str, window: int, advance) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(split, tokens, lengths, keys, sources) to write, in order."""
        for stats in self.inputs:
            stats.sha256 = pool.apply_async(file_sha256, (stats.path,))  # in a worker, as the reading is
        tasks = (
            (parts.read_part, (path, span, not self._resumed(), dtype), src)
            for src, path, span in _parts(pool, [s.path for s in self.inputs], window)
        )
        for src, args, part in _ordered(pool, tasks, window):
            yield from self._take(src, args, part, pool)
            span = args[1]
            advance(span[1] - span[0] if span is not None else input_size(self.inputs[src].path))

    def _take(self, src: int, args: tuple, part: parts.PartResult, pool):
        stats = self.inputs[src]
        stats.reader_skips.merge(part.reader_skips)
        stats.clean_skips.merge(part.clean_skips)
        stats.yielded += part.read
        n = len(part.digests) // 16
        if not n:
            return
        keys, split = parts.split_of(part.digests, self.cfg.valid_fraction)
        keep = self.keys.add_new(keys) if self.keys is not None else np.ones(n, dtype=bool)
        dups = np.flatnonzero(~keep)
        if len(dups):
            room = max(0, stats.clean_skips.max_examples - len(stats.clean_skips.examples.get("duplicate", [])))
            for i in dups[:room]:
                stats.clean_skips.add("duplicate", f"{stats.path}:{parts.where_of(part.wheres, i)}")
            if len(dups) > room:
                stats.clean_skips.counts["duplicate"] += len(dups) - room
        ship = keep.copy()
        for s in (TRAIN, VALID):
            mine = keep & (split == s)
            order = self.seen[s] + np.cumsum(mine) - 1  # position of each document within its split
            ship &= ~(mine & (order < self.skip_first[s]))
            count = int(mine.sum())
            self.seen[s] += count
            stats.written[s] += count
        if not ship.any():
            return
        if part.tokens is None:  # read while resuming, but it reaches past the finished shards
            part = pool.apply(parts.read_part, args[:2] + (True,) + args[3:])
        for s in (TRAIN, VALID):
            mine = ship[split == s]  # the part's documents of split s, in order
            if not mine.any():
                continue
            tokens, lengths = part.tokens[s], part.lengths[s]
            if not mine.all():
                tokens, lengths = tokens[np.repeat(mine, lengths)], lengths[mine]
            yield s, tokens, lengths, keys[split == s][mine], np.full(len(lengths), src, dtype=np.int32)


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
    if not out_dir.exists() or not any(f.name != LOCK_FILE for f in out_dir.iterdir()):
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
    if not state.get("shards"):
        # No shard of that run finished (it failed before its first, e.g. on a wrong --text-key): nothing
        # to resume, so start over with these arguments, whatever that run's were.
        for f in out_dir.iterdir():
            if f.name == PROGRESS or _is_ours(f.name):
                f.unlink()
        return None, []
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
    """Tokenize ``inputs`` (this node's slice) into a shard dir; resume an interrupted run; return a report.

    One writer per dir (a second fails at once); a full disk, Ctrl-C or SIGTERM end with one line, the
    finished shards intact and nothing unfinished under a final name; a run that writes no training
    document is an error that says why.
    """
    out_dir = Path(out_dir)
    with dir_lock(out_dir, "clova tokenize", note=note), stop_on_sigterm():
        try:
            result = _tokenize_corpus(inputs, tokenizer_dir, out_dir, cfg, show_progress=show_progress)
        except (KeyboardInterrupt, OSError) as e:
            if isinstance(e, OSError) and not is_disk_full(e):
                raise
            kept = drop_unrecorded(out_dir, PROGRESS, _is_ours)
            resume = f"{kept} finished shard(s) in {out_dir} are intact; rerun the same command to resume"
            if isinstance(e, OSError):
                raise ClovaError(f"{out_dir}: {e.strerror} while writing shards; {resume} once there is room") from None
            raise Interrupted(f"{out_dir}: interrupted ({signal_name(e)}); {resume}") from None
    check_usable(result, out_dir)
    return result


def _tokenize_corpus(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: Path,
    cfg: ShardConfig,
    *,
    show_progress: bool = True,
) -> dict:
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
        return report(done, out_dir, time.perf_counter() - t0, workers=0, resumed=len(done["shards"]), complete=True)

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
    with worker_pool(ctx, workers, parts.init_worker, (str(tok.path), workers > 1, cfg)) as pool:
        stream = _DocumentStream(paths, cfg, skip_first)
        try:
            with progress_bar("tokenizing", sum(input_size(p) for p in paths), enabled=show_progress, unit="bytes") as advance:
                for s, tokens, lengths, keys, sources in stream.batches(pool, dtype.name, 2 * workers + 2, advance):
                    series[s].add(tokens, lengths, keys, sources)
            for shards in series:
                shards.close()
        except BaseException:
            for shards in series:
                shards.abort()
            raise
        input_records = [s.record() for s in stream.inputs]

    manifest = build_manifest(cfg, tokenizer_info, dtype, fingerprint, input_records, progress.state["shards"])
    manifest["node"] = {"num_nodes": cfg.num_nodes, "node_rank": cfg.node_rank, "input_files_total": len(all_paths)}
    atomic_write_json(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink()
    fsync_path(out_dir)
    return report(manifest, out_dir, time.perf_counter() - t0, workers=workers, resumed=len(kept), complete=False)


# ------------------------------------------------------------------ merge


