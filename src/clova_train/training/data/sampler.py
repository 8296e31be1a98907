"""Training samples from shard dirs: packing, blending, and one global order fixed by the seed.

Each shard dir's documents (EOD already appended) are shuffled once per epoch,
concatenated, and cut into windows of ``seq_len + 1`` tokens (inputs and
shifted targets), consecutive windows sharing one boundary token as in
Megatron-LM; the window order is shuffled too. Several dirs are blended by
weight with Megatron's greedy rule, which needs no randomness: global sample
``i`` comes from the dataset furthest below its share after ``i`` samples.

The global sample order depends only on the seed, the data and the weights,
never on the number of ranks: global batch ``b`` is samples
``[b * global_batch, (b + 1) * global_batch)`` and each data-parallel rank
takes one contiguous slice of it. The resumable state is tiny: the next global
sample index and how many samples each dataset has given so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clova_train.core.errors import ClovaError

# The validation windows are a property of the data, not of the run's seed: every run over the same
# shard dirs evaluates the same windows, and an export can score them again.
EVAL_SEED = 0


@dataclass
class DataConfig:
    """Which shard dirs feed training, and how they are mixed."""

    paths: list[str] = field(default_factory=list)
    """Shard dirs made by `clova tokenize`; their train splits are blended, their valid splits evaluated."""
    weights: list[float] = field(default_factory=list)
    """Relative sampling weight of each dir, in the order of ``paths`` (empty: proportional to train tokens)."""
    cache: str = ""
    """Where the sample indices are built and memory-mapped (empty: RUN_DIR/data_cache); share one across runs."""
    cache_timeout: float = 7200.0
    """Seconds a rank waits for another process to build the sample indices before giving up."""

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.weights = [float(w) for w in self.weights]
        if self.weights and len(self.weights) != len(self.paths):
            raise ClovaError(f"data: {len(self.weights)} weights for {len(self.paths)} shard dirs; give one per dir or none")
        if any(not w > 0 for w in self.weights):
            raise ClovaError(f"data: weights must be > 0, got {self.weights}")
        if not self.cache_timeout > 0:
            raise ClovaError(f"data: cache_timeout must be > 0, not {self.cache_timeout}")
        if len(set(self.paths)) != len(self.paths):
            raise ClovaError("data: a shard dir is listed twice; give it a larger weight instead")


def parse_data_spec(spec: str) -> tuple[str, float | None]:
    """``DIR`` or ``DIR:WEIGHT`` -> (dir, weight or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a ':' that belongs to the path
    return spec, None


def data_config_from_specs(specs: Sequence[str]) -> DataConfig:
    """``--data A:3 B:1`` -> DataConfig; either every dir has a weight or none has."""
    parsed = [parse_data_spec(s) for s in specs]
    weights = [w for _, w in parsed if w is not None]
    if weights and len(weights) != len(parsed):
        raise ClovaError("--data: give a weight to every shard dir (DIR:WEIGHT) or to none")
    return DataConfig(paths=[p for p, _ in parsed], weights=weights)


class PackedDataset:
    """The documents of some shards, shuffled per epoch, concatenated and cut into windows.

    ``ds[k]`` is sample ``k`` (int64, ``seq_len + 1`` tokens); samples past
    the first epoch come from later epochs, each with its own document and
    window order. ``shuffle=False`` keeps file order (the validation set).
    With ``cache`` and ``spec`` each epoch's index is memory-mapped from the
    cache (built there by this process only if nobody built it before); without
    them it is computed in RAM, as small tests do.
    """

    def __init__(self, shards: Sequence, seq_len: int, seed: int, *, stream: int = 0, shuffle: bool = True, name: str = "",
                 cache=None, spec=None):
        from clova_train.shards.index import IndexSpec

        self.shards = list(shards)
        self.seq_len = seq_len
        self.seed = seed
        self.stream = stream
        self.shuffle = shuffle
        self.name = name
        self.cache = cache
        self.spec = spec or IndexSpec("", seq_len, seed, stream, shuffle)
        # Per shard only (never per document): what a rank holds does not grow with the corpus.
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])  # first global doc of each shard
        self.n_tokens = int(sum(_shard_tokens(s) for s in self.shards))
        # Windows overlap by one token, so n tokens give (n - 1) // seq_len of them.
        self.samples_per_epoch = max(0, (self.n_tokens - 1) // seq_len)
        self._epochs: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def doc_sizes(self) -> np.ndarray:
        """Every document's size, in file order (read only to build an index)."""
        from clova_train.shards.index import all_sizes

        return all_sizes(self.shards)

    def epoch_key(self, e: int) -> str:
        return self.spec.key(e)

    def _epoch(self, e: int) -> tuple:
        """(document order, token offset of each document in the stream, window order); order and windows
        are None when unshuffled (file order)."""
        if e not in self._epochs:
            from clova_train.shards.index import epoch_arrays

            key = self.spec.key(e)
            arrays = self.cache.open(key) if self.cache is not None else None
            if arrays is None and self.cache is not None:
                self.cache.build(key, self.doc_sizes(), self.n_tokens, self.spec, e)
                arrays = self.cache.open(key)
            if arrays is None:
                arrays = epoch_arrays(self.doc_sizes(), self.n_tokens, self.spec, e)
            if len(self._epochs) >= 2:  # an epoch boundary needs two; older ones are never read again
                del self._epochs[min(self._epochs)]
            self._epochs[e] = (arrays.get("order"), arrays["starts"], arrays.get("windows"))
        return self._epochs[e]

    def _doc_tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        shard = int(np.searchsorted(self.shard_starts, doc, side="right")) - 1
        return self.shards[shard].get(doc - int(self.shard_starts[shard]), offset, length)

    def __getitem__(self, k: int) -> np.ndarray:
        if self.samples_per_epoch == 0:
            raise IndexError(f"{self.name}: no complete sample of {self.seq_len + 1} tokens")
        e, j = divmod(int(k), self.samples_per_epoch)
        order, starts, windows = self._epoch(e)
        start = int(windows[j] if windows is not None else j) * self.seq_len
        i = int(np.searchsorted(starts, start, side="right")) - 1
        offset, need, pieces = start - int(starts[i]), self.seq_len + 1, []
        while need:
            piece = self._doc_tokens(int(order[i]) if order is not None else i, offset, need)
            pieces.append(piece)
            need -= len(piece)
            i, offset = i + 1, 0
        return np.concatenate(pieces).astype(np.int64)


def _shard_tokens(shard) -> int:
    n = getattr(shard, "num_tokens", None)
    return int(n) if n is not None else int(np.asarray(shard.sizes, dtype=np.int64).sum())


def blend(weights: np.ndarray, position: int, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Datasets and per-dataset sample indices of global samples ``position .. position + n``.

    Megatron-LM's rule: each sample goes to the dataset whose count lags its
    share the most (ties to the lower index). ``counts`` is updated in place.
    """
    choice = np.empty(n, dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    if len(weights) == 1:
        choice[:] = 0
        index[:] = np.arange(counts[0], counts[0] + n)
        counts[0] += n
        return choice, index
    # Plain Python floats: the same float64 arithmetic as numpy, without an
    # array op per sample (this runs every step, inside the timed region).
    w, c = weights.tolist(), counts.tolist()
    datasets = range(len(w))
    for i in range(n):
        t = position + i + 1
        d = max(datasets, key=lambda j: w[j] * t - c[j])  # first maximum, as argmax
        choice[i], index[i] = d, c[d]
        c[d] += 1
    counts[:] = c
    return choice, index


class TrainStream:
    """This rank's micro-batches of each global batch, in an order fixed by the seed; resumable."""

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        weights: Sequence[float],
        *,
        global_batch: int,
        micro_batch: int,
        rank: int,
        world: int,
        batch_at: Callable[[int], int] | None = None,
    ):
        """``batch_at``: the global batch that starts at a sample position, for a batch ramp (None: always ``global_batch``)."""
        if global_batch % (micro_batch * world):
            raise ClovaError(
                f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x {world} ranks; "
                "change --global-batch or --micro-batch"
            )
        for ds in datasets:
            if len(ds) == 0:
                raise ClovaError(
                    f"{ds.name}: its train split has {ds.n_tokens} tokens, fewer than one sample of "
                    f"{ds.seq_len + 1}; use a smaller --seq-len or more text"
                )
        self.datasets = list(datasets)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.global_batch = global_batch
        self.batch_at = batch_at
        self.micro_batch = micro_batch
        self.world = world
        self.rank = rank
        self.position = 0
        self.counts = np.zeros(len(self.datasets), dtype=np.int64)

    def next_batch(self) -> list[torch.Tensor]:
        """Advance one global batch; this rank's share as (micro_batch, seq_len + 1) int64 tensors."""
        # The next `batch` samples of the one global order, whatever the batch: a ramp changes where steps cut it, not it.
        batch = self.batch_size()
        choice, index = blend(self.weights, self.position, self.counts, batch)
        self.position += batch
        per_rank = batch // self.world
        lo = self.rank * per_rank
        rows = [self.datasets[d][k] for d, k in zip(choice[lo : lo + per_rank], index[lo : lo + per_rank])]
        samples = torch.from_numpy(np.stack(rows))
        return list(samples.split(self.micro_batch))

    def batch_size(self, position: int | None = None) -> int:
        """The global batch that starts at ``position`` (default: the next one)."""
        at = self.position if position is None else position
        return self.batch_at(at) if self.batch_at is not None else self.global_batch

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.datasets):
            raise ClovaError(
                f"the checkpoint's sampler blends {len(state['counts'])} shard dirs, this run {len(self.datasets)}"
            )
        self.position = int(state["position"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        old_len = int(state.get("seq_len", self.datasets[0].seq_len))
        if old_len != self.datasets[0].seq_len:
            # A context-extension stage: each dir continues at the token count it had reached. Windows of the new
            # length are their own shuffle of the same documents, so within this epoch some text recurs and some is
            # not seen (as with any change of sample order); the count of tokens trained stays exact.
            self.counts = -(-self.counts * old_len // self.datasets[0].seq_len)
            self.position = int(self.counts.sum())

    def state_dict(self) -> dict:
        return {"position": int(self.position), "counts": [int(c) for c in self.counts], "seq_len": int(self.datasets[0].seq_len)}

    def describe(self, state: dict | None = None) -> str:
        """Where a global batch starts, in words (for error messages)."""
        s = state or self.state_dict()
        per = ", ".join(f"{ds.name} sample {c}" for ds, c in zip(self.datasets, s["counts"]))
        return f"global samples {s['position']}..{s['position'] + self.batch_size(s['position']) - 1} ({per} onwards)"


def eval_windows(n_valid: int, samples: int, multiple: int) -> np.ndarray:
    """Which validation windows an evaluation scores: ``samples`` (rounded down to ``multiple``) spread over
    the whole valid stream by a stride from a seeded offset, so every input and every data dir is represented."""
    n = min(samples, n_valid)
    n -= n % multiple
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = n_valid // n
    offset = int(np.random.default_rng(EVAL_SEED).integers(stride))
    return offset + np.arange(n, dtype=np.int64) * stride


def eval_batches(valid: PackedDataset, samples: int, *, micro_batch: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of ``samples`` validation windows (:func:`eval_windows`), rounded down to whole
    micro-batches on every rank.

    Every rank gets the same number of micro-batches (ZeRO-3 forwards are
    collective). Fewer windows than a micro-batch per rank are scored in
    smaller micro-batches; empty only with fewer windows than ranks.
    """
    picks = eval_windows(len(valid), samples, micro_batch * world)
    if len(picks) == 0 and min(samples, len(valid)) >= world:
        picks = eval_windows(len(valid), samples, world)
        micro_batch = len(picks) // world
    if len(picks) == 0:
        return []
    per = len(picks) // world
    rows = [valid[int(k)] for k in picks[rank * per : (rank + 1) * per]]
    return list(torch.from_numpy(np.stack(rows)).split(micro_batch))


def no_validation_reason(n_valid: int, eval_every: int, samples: int, world: int) -> str:
    """Why a run scores no validation windows, in the words of the flag or data that decide it."""
    if not eval_every or not samples:
        return "--eval-every 0" if not eval_every else "--eval-samples 0"
    if n_valid == 0:
        return "the shards' valid split is empty: tokenize with --valid-fraction above 0"
    return f"the valid split has {n_valid} windows, fewer than the {world} data-parallel ranks: tokenize with a larger --valid-fraction"


def _open(paths: Sequence[str | Path], split: str, seq_len: int, seed: int, stream: int, shuffle: bool, name: str, cache) -> PackedDataset:
    from clova_train.shards.format import open_split, read_manifest
    from clova_train.shards.index import IndexCache, spec_for_manifests

    spec = spec_for_manifests([read_manifest(p) for p in paths], split, seq_len, seed, stream, shuffle)
    shards = [s for p in paths for s in open_split(p, split)]
    store = IndexCache(cache) if cache else None
    return PackedDataset(shards, seq_len, seed, stream=stream, shuffle=shuffle, name=name, cache=store, spec=spec)


def open_train_data(paths: Sequence[str | Path], seq_len: int, seed: int, cache: str | Path | None = None) -> list[PackedDataset]:
    """One PackedDataset per shard dir (its train split); with ``cache``, its indices are mapped from there."""
    return [_open([p], "train", seq_len, seed, i, True, str(p), cache) for i, p in enumerate(paths)]


def open_valid_data(paths: Sequence[str | Path], seq_len: int, cache: str | Path | None = None) -> PackedDataset:
    """The valid splits of all shard dirs, in file order, as one dataset."""
    from clova_train.shards.index import VALID_SEED

    return _open(list(paths), "valid", seq_len, VALID_SEED, 0, False, "valid", cache)


def token_weights(manifests: Sequence[dict]) -> list[float]:
    """The default blend: each dir weighted by its train tokens."""
    return [float(sum(s["tokens"] for s in m["shards"] if s["split"] == "train")) for m in manifests]


def build_run_indices(specs: Sequence[str], cache: str | Path, *, seq_len: int, seed: int, total_samples: int, note=None) -> dict:
    """`clova shards index`: what a run over ``--data specs`` for ``total_samples`` samples maps, built here.

    0 samples: one epoch of each dir. The keys equal the run's when the dirs
    come in the same order with the same seed and seq_len.
    """
    from clova_train.shards.format import read_manifest
    from clova_train.shards.index import build_indices

    data = data_config_from_specs(specs)
    datasets = open_train_data(data.paths, seq_len, seed)
    weights = data.weights or token_weights([read_manifest(p) for p in data.paths])
    epochs = index_keys(datasets, weights, total_samples)[0] if total_samples else [1] * len(datasets)
    summary = build_indices(data.paths, cache, seq_len=seq_len, seed=seed, epochs=epochs, note=note)
    return {**summary, "epochs": epochs}


def check_order_version(state: dict, where) -> None:
    """A checkpoint's sampler position means something only under the sample order that wrote it
    (checkpoints from before the version was recorded used version 1)."""
    from clova_train.shards.index import ORDER_VERSION

    version = state.get("order_version", 1)
    if version != ORDER_VERSION:
        raise ClovaError(
            f"{where} was written under sample order version {version} and this clova-train draws version "
            f"{ORDER_VERSION}; its data position would point at other samples: resume it with the clova-train "
            "that wrote it, or start a new --out"
        )


def index_keys(datasets: Sequence[PackedDataset], weights: Sequence[float], total_samples: int) -> tuple[list[int], list[str]]:
    """Epochs of each dataset that ``total_samples`` blended samples reach, and the cache keys of all of them."""
    from clova_train.shards.index import epochs_needed

    w = np.asarray(weights, dtype=np.float64)
    epochs = [min(AHEAD_EPOCHS, epochs_needed(len(ds), float(share), total_samples)) for ds, share in zip(datasets, w / w.sum())]
    return epochs, [ds.epoch_key(e) for ds, n in zip(datasets, epochs) for e in range(n)]


# Epochs built before step 1. A pre-training run passes over its data once or a few times; a small dataset
# read hundreds of times over would otherwise build hundreds of indices first. Later epochs are built into
# the cache by the first rank that reaches them (PackedDataset._epoch), each a small index by then.
AHEAD_EPOCHS = 8


def prepare_indices(data: DataConfig, seq_len: int, seed: int, total_samples: int, *, build: bool, note=None) -> tuple[list[PackedDataset], PackedDataset]:
    """The run's train datasets and validation set, their indices in ``data.cache`` for ``total_samples``.

    With ``build`` (one process of the job), missing entries are built in a
    child process (so no rank ever holds a whole index); everybody else waits
    for them on the file system, never in a collective.
    """
    from clova_train.shards.index import IndexCache, build_in_subprocess

    datasets = open_train_data(data.paths, seq_len, seed, cache=data.cache)
    valid = open_valid_data(data.paths, seq_len, cache=data.cache)
    epochs, keys = index_keys(datasets, data.weights, total_samples)
    keys.append(valid.epoch_key(0))
    store = IndexCache(data.cache)
    if build and not all(store.ready(k) for k in keys):
        build_in_subprocess(data.paths, data.cache, seq_len=seq_len, seed=seed, epochs=epochs)
    store.wait(keys, data.cache_timeout, what=f"{len(data.paths)} shard dir(s), seq_len {seq_len}, seed {seed}", note=note)
    return datasets, valid
