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
from typing import Sequence

import numpy as np
import torch

from clova_train.core.errors import ClovaError


@dataclass
class DataConfig:
    """Which shard dirs feed training, and how they are mixed."""

    paths: list[str] = field(default_factory=list)
    """Shard dirs made by `clova tokenize`; their train splits are blended, their valid splits evaluated."""
    weights: list[float] = field(default_factory=list)
    """Relative sampling weight of each dir, in the order of ``paths`` (empty: proportional to train tokens)."""

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.weights = [float(w) for w in self.weights]
        if self.weights and len(self.weights) != len(self.paths):
            raise ClovaError(f"data: {len(self.weights)} weights for {len(self.paths)} shard dirs; give one per dir or none")
        if any(not w > 0 for w in self.weights):
            raise ClovaError(f"data: weights must be > 0, got {self.weights}")
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
    """

    def __init__(self, shards: Sequence, seq_len: int, seed: int, *, stream: int = 0, shuffle: bool = True, name: str = ""):
        self.shards = list(shards)
        self.seq_len = seq_len
        self.seed = seed
        self.stream = stream
        self.shuffle = shuffle
        self.name = name
        sizes = [np.asarray(s.sizes, dtype=np.int64) for s in self.shards]
        self.doc_sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        self.shard_starts = np.cumsum([0] + [len(s) for s in sizes])  # first global doc of each shard
        self.n_tokens = int(self.doc_sizes.sum())
        # Windows overlap by one token, so n tokens give (n - 1) // seq_len of them.
        self.samples_per_epoch = max(0, (self.n_tokens - 1) // seq_len)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, token offset of each document in the stream, window order)."""
        if e not in self._epochs:
            n_docs = len(self.doc_sizes)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.stream, e])
                order = rng.permutation(n_docs)
                windows = rng.permutation(self.samples_per_epoch)
            else:
                order, windows = np.arange(n_docs), np.arange(self.samples_per_epoch)
            starts = np.zeros(n_docs + 1, dtype=np.int64)
            np.cumsum(self.doc_sizes[order], out=starts[1:])
            if len(self._epochs) >= 2:  # an epoch boundary needs two; older ones are never read again
                del self._epochs[min(self._epochs)]
            self._epochs[e] = (order, starts, windows)
        return self._epochs[e]

    def _doc_tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        shard = int(np.searchsorted(self.shard_starts, doc, side="right")) - 1
        return self.shards[shard].get(doc - int(self.shard_starts[shard]), offset, length)

    def __getitem__(self, k: int) -> np.ndarray:
        if self.samples_per_epoch == 0:
            raise IndexError(f"{self.name}: no complete sample of {self.seq_len + 1} tokens")
        e, j = divmod(int(k), self.samples_per_epoch)
        order, starts, windows = self._epoch(e)
        start = int(windows[j]) * self.seq_len
        i = int(np.searchsorted(starts, start, side="right")) - 1
        offset, need, pieces = start - int(starts[i]), self.seq_len + 1, []
        while need:
            piece = self._doc_tokens(int(order[i]), offset, need)
            pieces.append(piece)
            need -= len(piece)
            i, offset = i + 1, 0
        return np.concatenate(pieces).astype(np.int64)


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
    ):
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
        self.micro_batch = micro_batch
        self.per_rank = global_batch // world
        self.rank = rank
        self.position = 0
        self.counts = np.zeros(len(self.datasets), dtype=np.int64)

    def next_batch(self) -> list[torch.Tensor]:
        """Advance one global batch; this rank's share as (micro_batch, seq_len + 1) int64 tensors."""
        choice, index = blend(self.weights, self.position, self.counts, self.global_batch)
        self.position += self.global_batch
        lo = self.rank * self.per_rank
        rows = [self.datasets[d][k] for d, k in zip(choice[lo : lo + self.per_rank], index[lo : lo + self.per_rank])]
        samples = torch.from_numpy(np.stack(rows))
        return list(samples.split(self.micro_batch))

    def state_dict(self) -> dict:
        return {"position": int(self.position), "counts": [int(c) for c in self.counts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.datasets):
            raise ClovaError(
                f"the checkpoint's sampler blends {len(state['counts'])} shard dirs, this run {len(self.datasets)}"
            )
        self.position = int(state["position"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)

    def describe(self, state: dict | None = None) -> str:
        """Where a global batch starts, in words (for error messages)."""
        s = state or self.state_dict()
        per = ", ".join(f"{ds.name} sample {c}" for ds, c in zip(self.datasets, s["counts"]))
        return f"global samples {s['position']}..{s['position'] + self.global_batch - 1} ({per} onwards)"


def eval_batches(valid: PackedDataset, samples: int, *, micro_batch: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of the first ``samples`` validation windows, rounded down to whole micro-batches on every rank.

    Every rank gets the same number of micro-batches (ZeRO-3 forwards are
    collective). Empty when the valid split is too small.
    """
    n = min(samples, len(valid))
    n -= n % (micro_batch * world)
    if n == 0:
        return []
    per = n // world
    rows = [valid[k] for k in range(rank * per, (rank + 1) * per)]
    return list(torch.from_numpy(np.stack(rows)).split(micro_batch))


def open_train_data(paths: Sequence[str | Path], seq_len: int, seed: int) -> list[PackedDataset]:
    """One PackedDataset per shard dir (its train split)."""
    from clova_train.shards.format import open_split

    return [
        PackedDataset(open_split(p, "train"), seq_len, seed, stream=i, name=str(p)) for i, p in enumerate(paths)
    ]


def open_valid_data(paths: Sequence[str | Path], seq_len: int) -> PackedDataset:
    """The valid splits of all shard dirs, in file order, as one dataset."""
    from clova_train.shards.format import open_split

    shards = [s for p in paths for s in open_split(p, "valid")]
    return PackedDataset(shards, seq_len, 0, shuffle=False, name="valid")
