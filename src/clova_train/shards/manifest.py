"""The shard dir's manifest.json and the report `clova tokenize` and `merge` print from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clova_train import __version__
from clova_train.shards.keys import DEDUP_METHOD, SPLIT_METHOD
from clova_train.text.readers import (
    SkipCounts,
)
from clova_train.shards.format import MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS, ShardConfig, dtype_code


def build_manifest(cfg: ShardConfig, tokenizer: dict, dtype: np.dtype, fingerprint: dict, inputs: list, shards: list) -> dict:
    # Train and valid shards finish interleaved in an order that depends on batching;
    # listing them split by split keeps the manifest identical for any --workers.
    shards = sorted(shards, key=lambda r: SPLITS.index(r["split"]))
    skipped = SkipCounts()
    for rec in inputs:
        skipped.merge(skips_from_dict(rec["skipped"]))
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


def skips_from_dict(d: dict) -> SkipCounts:
    s = SkipCounts()
    for reason, n in d["by_reason"].items():
        s.counts[reason] += n
        s.examples[reason] = list(d["examples"].get(reason, []))
    return s


def report(manifest: dict, out_dir: Path, seconds: float, *, workers: int, resumed: int, complete: bool) -> dict:
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
