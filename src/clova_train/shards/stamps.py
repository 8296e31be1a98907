"""Verification stamps: what a full check of a shard saw of each file, and the cheap re-check a restart makes.

A stamp records a file's real path (a merged dir's views resolve into the node
dirs), size, mtime, sha256 and, for a .bin, a short hash of every
:data:`STAMP_BLOCK` bytes. A restart re-hashes every .idx (12 bytes per
document) and a seeded sample of .bin blocks against the stamp: cheap at any
size, and a changed file is checked in full again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

STAMP_BLOCK = 1 << 22
"""Bytes per hashed block of a .bin in a verification stamp (a resume re-reads a seeded few of them)."""


def block_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def file_stamp(path: Path, sha256: str, **extra) -> dict:
    """What a verification saw of one file: where it really is (node dirs behind a merged dir's links), its size,
    mtime and hash."""
    st = path.stat()
    return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, **extra}


def scan_bin(path: Path, dtype: np.dtype, last_tokens: np.ndarray, eod_id: int | None) -> tuple[str, list[str], int, int]:
    """One read of a .bin: (sha256, block hashes, largest id, first document not ending with EOD or -1)."""
    sha, blocks, top, bad, pos, j = hashlib.sha256(), [], -1, -1, 0, 0
    le = dtype.newbyteorder("<")
    with open(path, "rb") as f:
        while data := f.read(STAMP_BLOCK):  # a multiple of every itemsize, so no token straddles two blocks
            sha.update(data)
            blocks.append(block_hash(data))
            arr = np.frombuffer(data, dtype=le)
            if arr.size:
                top = max(top, int(arr.max()))
            k = int(np.searchsorted(last_tokens, pos + arr.size))
            if eod_id is not None and bad < 0 and k > j:
                wrong = arr[last_tokens[j:k] - pos] != eod_id
                if wrong.any():
                    bad = j + int(np.argmax(wrong))
            j, pos = k, pos + arr.size
    return sha.hexdigest(), blocks, top, bad




def spot_check(stamps: dict, want: dict, rng: np.random.Generator, blocks: int = 2) -> str | None:
    """Re-check one shard against the stamps of its last full check (``want``: file kind -> manifest sha256):
    each file's size and mtime, the whole .idx, ``blocks`` seeded .bin blocks. None if it holds, else why not."""
    from clova_train.core.files import file_sha256

    for kind, sha in want.items():
        st = stamps.get(kind)
        if st is None or st["sha256"] != sha:
            return f"{kind} not verified under this manifest"
        try:
            now = os.stat(st["path"])
        except OSError:
            return f"{st['path']} is gone"
        if (now.st_size, now.st_mtime_ns) != (st["bytes"], st["mtime_ns"]):
            return f"{st['path']} changed since it was verified"
    if "idx" in want and file_sha256(stamps["idx"]["path"]) != want["idx"]:
        return f"{stamps['idx']['path']}: sha256 differs"
    bin_stamp = stamps.get("bin")
    if bin_stamp and bin_stamp.get("blocks"):
        hashes = bin_stamp["blocks"]
        with open(bin_stamp["path"], "rb") as f:
            for b in sorted(rng.choice(len(hashes), size=min(blocks, len(hashes)), replace=False).tolist()):
                f.seek(b * STAMP_BLOCK)
                if block_hash(f.read(STAMP_BLOCK)) != hashes[b]:
                    return f"{bin_stamp['path']}: block {b} differs from its last verification"
    return None
