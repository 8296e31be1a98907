"""Sample indices of packed windows, built once per epoch into a cache dir and memory-mapped by every rank.

Megatron-LM's GPTDataset keeps its document, sample and shuffle indices as
``.npy`` files keyed by a hash of what decides them; so do we. One entry holds
one epoch of one dataset:

``order.npy``
    The document order of the epoch (int32 while the count fits, else int64);
    absent for an unshuffled dataset (file order).
``starts.npy``
    int64, ``n_docs + 1``: the token offset of each document of the epoch's
    stream, in that order (``starts[-1]`` is the stream's length).
``windows.npy``
    The window order (int32 while it fits, else int64); absent when unshuffled.

That is 12 bytes per document and 4 (8 past 2**31 windows) per sample, built
by one process; a rank maps them and touches only the pages of the samples it
reads, so its memory does not grow with the number of documents. An entry is
written under a temporary name and renamed into place complete; readers that
find it missing wait on the file system, never in a collective.

The order is today's in-RAM order, bit for bit: ``default_rng([seed, stream,
epoch])`` draws the document permutation, then the window permutation.
:data:`ORDER_VERSION` names it; a change of order bumps it, and a checkpoint
made under another version is refused on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, fsync_path, remove_dead_tmp, tmp_name

ORDER_VERSION = 1
VALID_SEED = 0
ENTRY_FILE = "index.json"
_CHUNK = 1 << 22  # documents per cumsum chunk: bounds the builder's temporaries


def split_fingerprint(manifest: dict, split: str = "train") -> str:
    """Identifies a shard dir's split by content, wherever it is mounted (the run identity uses it for train)."""
    shards = sorted((s["prefix"], s.get("bin_sha256", "")) for s in manifest["shards"] if s["split"] == split)
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def _index_fingerprint(manifest: dict, split: str) -> list:
    """Everything of a split that decides its index: each shard's files and counts, in manifest order."""
    return [
        [s["prefix"], s.get("bin_sha256", ""), s.get("idx_sha256", ""), s["documents"], s["tokens"]]
        for s in manifest["shards"]
        if s["split"] == split
    ]


@dataclass(frozen=True)
class IndexSpec:
    """What decides one dataset's sample index (besides the epoch)."""

    data: str
    """sha256 of the shards' files and counts, in order."""
    seq_len: int
    """Tokens per sample minus one (windows share a boundary token)."""
    seed: int
    """The run's seed."""
    stream: int
    """The dataset's place in the --data list: each dir has its own random stream."""
    shuffle: bool = True
    """False: file order (the validation set)."""

    def key(self, epoch: int) -> str:
        desc = json.dumps({**asdict(self), "epoch": int(epoch), "order_version": ORDER_VERSION}, sort_keys=True)
        return hashlib.sha256(desc.encode()).hexdigest()[:32]


def spec_for_manifests(manifests: Sequence[dict], split: str, seq_len: int, seed: int, stream: int, shuffle: bool) -> IndexSpec:
    desc = json.dumps([_index_fingerprint(m, split) for m in manifests])
    return IndexSpec(hashlib.sha256(desc.encode()).hexdigest(), seq_len, seed, stream, shuffle)


def _int_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def epoch_arrays(doc_sizes: np.ndarray, n_tokens: int, spec: IndexSpec, epoch: int, alloc: Callable | None = None) -> dict:
    """One epoch's index arrays, each allocated by ``alloc(name, length, dtype)`` (default: in RAM)."""
    alloc = alloc or (lambda _name, n, dtype: np.empty(n, dtype=dtype))
    n_docs = len(doc_sizes)
    samples = max(0, (n_tokens - 1) // spec.seq_len)
    out: dict[str, np.ndarray] = {}
    order = None
    if spec.shuffle:
        rng = np.random.default_rng([spec.seed, spec.stream, epoch])
        perm = rng.permutation(n_docs)
        out["order"] = order = alloc("order", n_docs, _int_dtype(n_docs))
        order[:] = perm
        del perm
        # Drawn after the document order from the same generator, as the in-RAM sampler did.
        perm = rng.permutation(samples)
        out["windows"] = windows = alloc("windows", samples, _int_dtype(samples))
        windows[:] = perm
        del perm
    starts = out["starts"] = alloc("starts", n_docs + 1, np.dtype(np.int64))
    starts[0] = 0
    total = 0
    for lo in range(0, n_docs, _CHUNK):
        hi = min(n_docs, lo + _CHUNK)
        part = doc_sizes[order[lo:hi]] if order is not None else doc_sizes[lo:hi]
        np.cumsum(part, dtype=np.int64, out=starts[lo + 1 : hi + 1])
        starts[lo + 1 : hi + 1] += total
        total = int(starts[hi])
    if total != n_tokens:
        raise ClovaError(f"document sizes sum to {total} tokens but the manifest says {n_tokens}; run `clova shards verify`")
    return out


class IndexCache:
    """A directory of index entries, one subdirectory per (dataset, epoch) key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.entry(key) / ENTRY_FILE).is_file()

    def open(self, key: str) -> dict | None:
        """The entry's arrays, memory-mapped read-only; None when it is not built yet."""
        path = self.entry(key)
        if not self.ready(key):
            return None
        try:
            meta = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
            return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        except (OSError, ValueError, KeyError) as e:
            raise ClovaError(f"{path}: a damaged sample-index entry ({e}); delete that directory and rerun") from None

    def build(self, key: str, doc_sizes: np.ndarray, n_tokens: int, spec: IndexSpec, epoch: int) -> None:
        """Write one entry under a temporary name, then rename it into place (a concurrent builder's copy is equal)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.entry(key)
        remove_dead_tmp(final)
        tmp = tmp_name(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            files = []

            def alloc(name, n, dtype):
                files.append(name)
                return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))

            arrays = epoch_arrays(doc_sizes, n_tokens, spec, epoch, alloc)
            for name, arr in arrays.items():
                arr.flush()
                fsync_path(tmp / f"{name}.npy")
            del arrays
            atomic_write_json(tmp / ENTRY_FILE, {"spec": asdict(spec), "epoch": epoch, "order_version": ORDER_VERSION,
                                                 "documents": len(doc_sizes), "tokens": n_tokens, "arrays": files})
            fsync_path(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.ready(key):  # someone else's complete entry is as good as ours
                    raise
            fsync_path(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self, keys: Sequence[str], timeout: float, *, what: str, note: Callable[[str], None] | None = None,
             poll: float = 2.0, every: float = 60.0) -> None:
        """Poll until every entry exists; a progress line every ``every`` seconds, ClovaError after ``timeout``."""
        t0 = last = time.monotonic()
        while True:
            missing = [k for k in keys if not self.ready(k)]
            if not missing:
                return
            now = time.monotonic()
            if now - t0 > timeout:
                raise ClovaError(
                    f"{self.root}: {len(missing)} of {len(keys)} sample-index entries ({what}) still missing after "
                    f"{timeout:.0f} s; check the building rank's log, or build them ahead with `clova shards index`"
                )
            if note and now - last >= every:
                note(f"waiting for {len(missing)} sample-index entries in {self.root} ({now - t0:.0f} s)")
                last = now
            time.sleep(poll)


# ------------------------------------------------------------------ building for shard dirs


def all_sizes(shards: Sequence) -> np.ndarray:
    """Every document's size, in order, copied into one int32 array (no view keeps a shard's map open)."""
    out = np.empty(sum(len(s) for s in shards), dtype=np.int32)
    pos = 0
    for s in shards:
        out[pos : pos + len(s)] = s.sizes
        pos += len(s)
    return out


def epochs_needed(samples_per_epoch: int, share: float, total_samples: int) -> int:
    """Epochs of one dataset that ``total_samples`` blended samples reach: the greedy blend stays within one
    sample of each dataset's share, so ``share * total + 2`` samples bound what it draws."""
    if samples_per_epoch < 1:
        return 1
    return max(1, -(-int(share * total_samples + 2) // samples_per_epoch))


def build_indices(paths: Sequence[str | Path], cache: str | Path, *, seq_len: int, seed: int,
                  epochs: Sequence[int], valid: bool = True, note: Callable[[str], None] | None = None) -> dict:
    """Build what a run over ``paths`` (in --data order) maps: ``epochs[i]`` epochs of dir i's train split,
    and the validation set over all valid splits. Entries already there are kept. A summary."""
    from clova_train.shards.format import open_split, read_manifest

    if len(epochs) != len(paths):
        raise ClovaError(f"{len(epochs)} epoch counts for {len(paths)} shard dirs")
    store = IndexCache(cache)
    manifests = [read_manifest(p) for p in paths]
    jobs = [([p], [m], "train", seed, i, True, range(int(e))) for i, (p, m, e) in enumerate(zip(paths, manifests, epochs))]
    if valid:  # one unshuffled set over all dirs, the same for every seed
        jobs.append((list(paths), manifests, "valid", VALID_SEED, 0, False, range(1)))
    built = kept = 0
    parts: list[str] = []
    t0 = time.perf_counter()
    for dirs, mans, split, job_seed, stream, shuffle, todo in jobs:
        spec = spec_for_manifests(mans, split, seq_len, job_seed, stream, shuffle)
        keys = [(e, spec.key(e)) for e in todo]
        missing = [(e, k) for e, k in keys if not store.ready(k)]
        kept += len(keys) - len(missing)
        if not missing:
            continue
        shards = [s for d in dirs for s in open_split(d, split)]
        sizes = all_sizes(shards)
        n_tokens = sum(s.num_tokens for s in shards)
        for e, k in missing:
            store.build(k, sizes, n_tokens, spec, e)
            built += 1
        done = [e for e, _ in missing]
        contiguous = done == list(range(done[0], done[-1] + 1))
        epochs_built = f"epoch {done[0]}" if len(done) == 1 else f"epochs {done[0]}-{done[-1]}" if contiguous else f"epochs {', '.join(map(str, done))}"
        parts.append(f"{split} of {dirs[0] if len(dirs) == 1 else f'{len(dirs)} dirs'}, {epochs_built} ({len(sizes):,} documents)")
        del sizes
    if note and parts:  # one line per start, however many epochs and dirs
        note(f"sample index: {'; '.join(parts)} ({time.perf_counter() - t0:.1f} s)")
    return {"cache": str(store.root), "built": built, "kept": kept, "seconds": time.perf_counter() - t0}


def build_in_subprocess(paths: Sequence[str], cache: str | Path, *, seq_len: int, seed: int, epochs: Sequence[int]) -> None:
    """:func:`build_indices` in a child process, so the caller's memory never holds a whole index."""
    import subprocess

    args = json.dumps({"paths": [str(p) for p in paths], "cache": str(cache), "seq_len": seq_len, "seed": seed, "epochs": list(epochs)})
    # Its progress lines go to this process's stdout; its error comes back on stderr.
    r = subprocess.run([sys.executable, "-m", __name__, args], stderr=subprocess.PIPE, text=True)
    if r.returncode:
        lines = (r.stderr or "").strip().splitlines()
        raise ClovaError(f"building the sample index in {cache} failed: {lines[-1] if lines else f'exit {r.returncode}'}")


def _main(argv: list[str]) -> int:
    req = json.loads(argv[0])
    try:
        build_indices(req["paths"], req["cache"], seq_len=req["seq_len"], seed=req["seed"], epochs=req["epochs"],
                      note=lambda line: print(line, flush=True))
    except ClovaError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
