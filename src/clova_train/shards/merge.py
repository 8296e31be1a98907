"""`clova tokenize merge`: node dirs of one corpus joined into one shard dir, without copying tokens."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from clova_train.shards.keys import KeySet
from clova_train.shards.manifest import build_manifest, report, skips_from_dict
from clova_train.core.errors import ClovaError
from clova_train.shards.format import OPEN_SHARDS, KEY_DTYPE, MANIFEST, IndexedDataset, ShardConfig, prefix_files, read_manifest, write_bytes, write_index
from clova_train.core.files import atomic_write_json, file_sha256, fsync_path, is_tmp_name, tmp_name


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
        node_inputs = [dict(r, skipped=skips_from_dict(r["skipped"]), documents_written=dict(r["documents_written"])) for r in man["inputs"]]
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
    manifest = build_manifest(
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
    return report(manifest, out_dir, 0.0, workers=0, resumed=0, complete=False)


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
    OPEN_SHARDS.drop(ds)  # fancy indexing copied them; the node dir's files stay unmapped
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
