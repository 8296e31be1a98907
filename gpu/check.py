"""`make gpu-check`: the CUDA path checked on an air-gapped GPU node with its own Python, from the bundle.

Uses the node's ``python3`` as it is (no venv, no network): the bundle's
wheels (made by ``make gpu-bundle``) are installed with ``pip --no-index
--no-deps --target`` into a temporary folder that goes in front of the node's
packages, and every stage runs as its own process under a deadline:

  versions     python, torch, CUDA, GPU, transformers, DeepSpeed, nvcc
  fused-adam   DeepSpeed's FusedAdam JIT-built with the node's nvcc (timed)
  train-zero1  bf16 ZeRO-1 and ZeRO-3 runs of `clova train` on the bundle's shards:
  train-zero3    FusedAdam, fp32 gradient sums, no skipped step, TFLOP/s
  export-*     `clova export` of each run, logits beside our model's on the GPU
  mfu          benchmarks/bench_gpu.py: MFU of ZeRO-1/ZeRO-3 beside transformers, gpt3 and llama blocks
  tp           with 2+ GPUs: bf16 ZeRO-1 on 2 GPUs at --tensor-parallel 1 and 2, the same curve
               (skipped, not failed, on one GPU)
  calibrate    `clova plan --calibrate`: one 1.3B block fwd+bwd at bf16, achieved/peak (the planner's
               kernel efficiency); on the CPU rehearsal, its one-line refusal without CUDA

When the second block family lands, it is one more stage here. Figures go to ``$OUT/gpu-check.json`` (OUT defaults to gpu-check-out/), each
stage's output to ``$OUT/gpu-check.log``, and a one-screen summary to stdout.
Exit 0 only if every check passed.

    python3 gpu/check.py [--bundle .gpu] [--out DIR] [--budget 540]

``--rehearse-on-cpu`` runs the same stages on this machine's CPU with a tiny
model (no bf16, FusedAdam or MFU): tests/test_gpu_bundle.py uses it to prove
the bundle installs and the check's code runs with only the node's packages.
Before the bundle is installed, only the standard library and the node's torch are imported here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_RUN = ["--model", "small", "--seq-len", "256", "--global-batch", "8", "--micro-batch", "2", "--steps", "4",
            "--lr", "1e-3", "--warmup", "1", "--save-every", "4", "--eval-every", "0", "--no-tensorboard", "--nproc-per-node", "1"]
CPU_RUN = ["--model", "tiny", "--seq-len", "64", "--global-batch", "4", "--micro-batch", "2", "--steps", "2",
           "--lr", "1e-3", "--warmup", "1", "--save-every", "2", "--eval-every", "0", "--no-tensorboard", "--nproc-per-node", "1"]
MODES = ("zero1", "zero3")
PARITY_TOL = 1e-3
# Per-stage ceilings in seconds; each stage also stops at the check's overall deadline.
CAPS = {"versions": 60, "fused-adam": 300, "train": 240, "export": 150, "mfu": 300, "calibrate": 180}


def cuda_problem(rehearse: bool) -> str | None:
    """Why this interpreter cannot run the check on CUDA, or None."""
    try:
        import torch
    except ImportError as e:
        return f"{sys.executable} cannot import torch ({e})"
    if rehearse or torch.cuda.is_available():
        return None
    return f"torch {torch.__version__} sees no CUDA device"


def bundle_problem(bundle: Path) -> str | None:
    """Why ``bundle`` is not a complete check bundle, or None."""
    desc_file = bundle / "bundle.json"
    if not desc_file.is_file():
        return f"{bundle}: no bundle here; run `make gpu-bundle` on a machine with the package registry and copy {bundle.name}/ beside this tree"
    try:
        desc = json.loads(desc_file.read_text())
    except ValueError as e:
        return f"{desc_file}: not readable JSON ({e}); copy the bundle again"
    if desc.get("kind") != "check":
        return f"{bundle}: a {desc.get('kind')} bundle has no check data; use the one `make gpu-bundle` writes"
    for name, sha in desc["wheels"].items():
        f = bundle / "wheels" / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != sha:
            return f"{f}: missing or changed since the bundle was made; copy the bundle again"
    return None


class Check:
    """The running record: checks, figures and the log, written out after every stage."""

    def __init__(self, out: Path, budget: float, rehearse: bool):
        self.out = out
        self.deadline = time.monotonic() + budget
        self.report: dict = {"mode": "cpu-rehearsal" if rehearse else "cuda", "ok": False, "checks": {}, "figures": {},
                             "seconds": {}}
        self.log = open(out / "gpu-check.log", "w", encoding="utf-8")

    def note(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.report["checks"][name] = {"ok": bool(ok), "detail": detail}
        self.note(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        return bool(ok)

    def run(self, stage: str, cmd: list[str], env: dict, cap: str) -> subprocess.CompletedProcess | None:
        """``cmd`` under its stage's ceiling; None (and a failed check) if it ran out of time or the budget is spent."""
        left = self.deadline - time.monotonic()
        limit = min(CAPS[cap], left)
        if limit < 10:
            self.check(stage, False, "not run: the check's time budget is spent")
            return None
        self.note(f"$ {' '.join(cmd)}")
        t0 = time.monotonic()
        # Its own process group, so a stage past its time goes with every process it started (training ranks
        # hold GPU memory the next stage needs).
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                             cwd=REPO, start_new_session=True)
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            self.report["seconds"][stage] = round(time.monotonic() - t0, 1)
            self.note(out + err)
            self.check(stage, False, f"stopped after {limit:.0f} s (its limit); the log has its output")
            return None
        self.report["seconds"][stage] = round(time.monotonic() - t0, 1)
        self.note(out + err)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    def save(self) -> None:
        self.report["ok"] = bool(self.report["checks"]) and all(c["ok"] for c in self.report["checks"].values())
        tmp = self.out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(self.out / "gpu-check.json")


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit code {r.returncode}")[:300]


def _result(r: subprocess.CompletedProcess) -> dict:
    """The JSON line a stage prints last (libraries may print above it)."""
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))


def install(c: Check, bundle: Path, site: Path) -> bool:
    wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
    r = c.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *wheels], dict(os.environ), "versions")
    return c.check("install", r is not None and r.returncode == 0,
                   f"{len(wheels)} wheels into {site}" if r is not None and r.returncode == 0 else (_last_line(r) if r else ""))


def clova(*args) -> list[str]:
    return [sys.executable, "-c", "from clova_train.cli import app; app()", *map(str, args)]


def stage_cmd(name: str, *args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", name, *map(str, args)]


def train(c: Check, mode: str, data: Path, work: Path, env: dict, rehearse: bool) -> Path | None:
    run = work / f"run-{mode}"
    run_args = CPU_RUN if rehearse else CUDA_RUN
    cmd = clova("train", *run_args, "--data", data / "shards", "--tokenizer", data / "tokenizer",
                "--out", run, "--parallel", mode)
    r = c.run(f"train-{mode}", cmd, env, "train")
    if r is None:
        return None
    if not c.check(f"train-{mode}", r.returncode == 0, "ran" if r.returncode == 0 else _last_line(r)):
        return None
    cfg = json.loads((run / "config.json").read_text())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    optimizer = next((line.strip() for line in r.stderr.splitlines() if "optimizer:" in line), "no optimizer line")
    c.report["figures"][f"train_{mode}"] = {
        "loss": [x["loss"] for x in recs], "grad_norm": [x["grad_norm"] for x in recs],
        "tflops_per_device": recs[-1].get("tflops_per_device") if recs else None,
        "precision": cfg["train"]["precision"], "device": cfg["run"]["device"], "optimizer": optimizer,
    }
    steps = int(run_args[run_args.index("--steps") + 1])
    c.check(f"train-{mode}-steps", len(recs) == steps and not any(x["skipped"] for x in recs) and all(x["grad_norm"] > 0 for x in recs),
            f"{len(recs)} steps, losses {[round(x['loss'], 3) for x in recs]}")
    if not rehearse:
        ds = cfg["deepspeed"]
        c.check(f"train-{mode}-bf16-fp32-sums", cfg["train"]["precision"] == "bf16" and ds.get("data_types") == {"grad_accum_dtype": "fp32"}
                and ds.get("communication_data_type") == "fp32", f"precision {cfg['train']['precision']}, data_types {ds.get('data_types')}, "
                f"communication {ds.get('communication_data_type')}")
        c.check(f"train-{mode}-fused-adam", "optimizer: DeepSpeed FusedAdam" in r.stderr and "torch_adam" not in ds["optimizer"]["params"], optimizer)
        c.check(f"train-{mode}-tflops", bool(recs) and (recs[-1].get("tflops_per_device") or 0) > 0, f"{recs[-1].get('tflops_per_device') if recs else None} TFLOP/s")
    return run


def same_start(c: Check) -> None:
    """bf16 kernels, the same weights and samples: both modes' first loss agrees closely."""
    first = [c.report["figures"][f"train_{m}"]["loss"][0] for m in MODES]
    c.check("zero1-zero3-first-loss", abs(first[0] - first[1]) <= 1e-3 * abs(first[1]), f"{first[0]:.5f} vs {first[1]:.5f}")


def export_parity(c: Check, mode: str, run: Path, data: Path, work: Path, env: dict) -> None:
    out = work / f"hf-{mode}"
    r = c.run(f"export-{mode}", clova("export", run, "--out", out, "--dtype", "fp32", "--no-verify", "--quiet"), env, "export")
    if r is None or not c.check(f"export-{mode}", r.returncode == 0, "written" if r.returncode == 0 else _last_line(r)):
        return
    r = c.run(f"parity-{mode}", stage_cmd("parity", run, out, data / "shards"), env, "export")
    if r is None or not c.check(f"parity-{mode}-ran", r.returncode == 0, "ran" if r.returncode == 0 else _last_line(r)):
        return
    fig = _result(r)
    c.report["figures"][f"export_{mode}"] = fig
    c.check(f"parity-{mode}", fig["max_abs_diff"] <= PARITY_TOL, f"max |logits diff| {fig['max_abs_diff']:.2e} on {fig['device']} (tolerance {PARITY_TOL})")


def mfu(c: Check, work: Path, env: dict) -> None:
    out = work / "mfu.json"
    r = c.run("mfu", [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--model", "1.3b", "--json", str(out)], env, "mfu")
    if out.is_file():
        c.report["figures"]["mfu"] = json.loads(out.read_text())
    if r is not None:
        c.check("mfu", r.returncode == 0, _last_line(r) if r.returncode else "gpt3 (ZeRO-1, ZeRO-3) and llama (ZeRO-1) beside transformers, measured with FusedAdam")


def tensor_parallel(c: Check, data: Path, work: Path, env: dict) -> None:
    """TP=2 against TP=1 on two GPUs (bf16 ZeRO-1, same data and seed): the same losses to bf16 precision."""
    r = c.run("tp-gpus", [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env, "versions")
    gpus = int(r.stdout.strip() or 0) if r is not None and r.returncode == 0 else 0
    if gpus < 2:
        c.report["figures"]["tensor_parallel"] = {"skipped": f"{gpus} GPU(s); tensor parallelism needs 2"}
        c.note(f"[SKIP] tp: {gpus} GPU(s), tensor parallelism needs 2")
        return
    losses = {}
    for tp in (1, 2):
        run = work / f"run-tp{tp}"
        args = [*CUDA_RUN[: CUDA_RUN.index("--nproc-per-node")], "--nproc-per-node", "2"]
        r = c.run(f"train-tp{tp}", clova("train", *args, "--data", data / "shards", "--tokenizer", data / "tokenizer", "--out", run,
                                          "--parallel", "zero1", "--tensor-parallel", str(tp)), env, "train")
        if r is None or not c.check(f"train-tp{tp}", r.returncode == 0, "ran" if r.returncode == 0 else _last_line(r)):
            return
        losses[tp] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    c.report["figures"]["tensor_parallel"] = {"loss_tp1": losses[1], "loss_tp2": losses[2]}
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses[1], losses[2]))
    c.check("tp2-equals-tp1", len(losses[1]) == len(losses[2]) and worst <= 1e-2, f"largest relative loss difference {worst:.1e} (bf16)")


def calibrate(c: Check, work: Path, env: dict, rehearse: bool) -> None:
    """`clova plan --calibrate` measures this GPU's kernel efficiency on one block and stores it where the planner reads it."""
    cal = work / "calibration.json"
    r = c.run("calibrate", clova("plan", "--model", "1.3b", "--gpus", "1", "--calibrate", "--json"), {**env, "CLOVA_CALIBRATION": str(cal)}, "calibrate")
    if r is None:
        return
    if rehearse:
        c.check("calibrate-needs-cuda", r.returncode != 0 and "needs CUDA" in r.stdout + r.stderr, _last_line(r))
        return
    if not c.check("calibrate", r.returncode == 0 and cal.is_file(), "measured" if r.returncode == 0 else _last_line(r)):
        return
    rec = json.loads(cal.read_text())
    c.report["figures"]["calibration"] = rec
    (kind, fig), = rec.items()
    plan = json.loads(r.stdout)
    c.check("calibrate-efficiency", 0.2 <= fig["kernel_efficiency"] <= 1.0 and plan["hardware"]["kernel_efficiency"] == fig["kernel_efficiency"],
            f"{kind}: {fig['tflops']:.0f} TFLOP/s of {fig['peak_tflops']:g} = {fig['kernel_efficiency']:.0%} on {fig['device']}, used by the plan")


def versions(c: Check, env: dict) -> None:
    r = c.run("versions", stage_cmd("versions"), env, "versions")
    if r is not None and c.check("versions", r.returncode == 0, "read" if r.returncode == 0 else _last_line(r)):
        c.report["versions"] = _result(r)


def fused_adam(c: Check, env: dict) -> None:
    r = c.run("fused-adam", stage_cmd("fused-adam"), env, "fused-adam")
    if r is not None and c.check("fused-adam", r.returncode == 0, "built and loaded" if r.returncode == 0 else _last_line(r)):
        c.report["figures"]["fused_adam_jit_build_s"] = _result(r)["seconds"]


def bench_rehearsal(c: Check, work: Path, env: dict) -> None:
    """On the CPU: every row of the MFU benchmark (both blocks, ours and transformers') for one tiny fp32 step, so the code
    the GPU runs has run before a GPU loan is spent on it."""
    out = work / "mfu-rehearsal.json"
    r = c.run("mfu-rehearsal", [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--rehearse-on-cpu", "--json", str(out)], env, "mfu")
    if r is None:
        return
    rows = [row["name"] for row in json.loads(out.read_text())["rows"]] if out.is_file() else []
    c.report["figures"]["mfu_rehearsal_rows"] = rows
    c.check("mfu-rehearsal", r.returncode == 0 and len(rows) == 5, f"rows {rows}" if r.returncode == 0 else _last_line(r))


def guarded(c: Check, name: str, fn, *args):
    """``fn(c, *args)``; an error of the check's own (an output it did not expect) is a failed check, not a traceback."""
    try:
        return fn(c, *args)
    except Exception as e:  # noqa: BLE001 - whatever broke, the other stages still run and the JSON is still written
        c.check(name, False, f"the check could not read this stage's result: {type(e).__name__}: {e}")
        return None
    finally:
        c.save()


def run_check(bundle: Path, out: Path, budget: float, rehearse: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, budget, rehearse)
    work = Path(tempfile.mkdtemp(prefix="clova-gpu-check-"))
    # A bundle installs to the same path every time: torch keys a JIT build on its include paths, so
    # FusedAdam, once built on a node, is not built again on the next check.
    key = hashlib.sha256(str(bundle.resolve()).encode() + (bundle / "bundle.json").read_bytes()).hexdigest()[:12]
    site = Path(tempfile.gettempdir()) / f"clova-gpu-site-{key}"
    shutil.rmtree(site, ignore_errors=True)
    data = bundle.resolve() / "data"
    t0 = time.monotonic()
    try:
        if install(c, bundle, site):
            paths = [str(site), str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}
            guarded(c, "versions", versions, env)
            guarded(c, "calibrate", calibrate, work, env, rehearse)
            if rehearse:
                guarded(c, "mfu-rehearsal", bench_rehearsal, work, env)
            else:
                guarded(c, "fused-adam", fused_adam, env)
            runs = {m: guarded(c, f"train-{m}", train, m, data, work, env, rehearse) for m in MODES}
            if all(runs.values()) and not rehearse:
                guarded(c, "zero1-zero3-first-loss", same_start)
            for m, run in runs.items():
                if run:
                    guarded(c, f"parity-{m}", export_parity, m, run, data, work, env)
            if not rehearse:
                guarded(c, "mfu", mfu, work, env)
                guarded(c, "tp", tensor_parallel, data, work, env)
    finally:
        c.report["seconds"]["total"] = round(time.monotonic() - t0, 1)
        c.save()
        c.log.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(site, ignore_errors=True)
    print(summary(c.report, out))
    return 0 if c.report["ok"] else 1


def summary(rep: dict, out: Path) -> str:
    v = rep.get("versions") or {}
    lines = [f"gpu-check ({rep['mode']}): {'PASSED' if rep['ok'] else 'FAILED'} in {rep['seconds'].get('total', 0):.0f} s",
             "  " + ", ".join(f"{k} {v[k]}" for k in ("gpu", "python", "torch", "cuda", "transformers", "deepspeed", "nvcc") if k in v)]
    f = rep["figures"]
    if "fused_adam_jit_build_s" in f:
        lines.append(f"  FusedAdam JIT build: {f['fused_adam_jit_build_s']:.0f} s")
    for m in MODES:
        t, e = f.get(f"train_{m}"), f.get(f"export_{m}")
        if t:
            lines.append(f"  {m}: loss {' '.join(f'{x:.3f}' for x in t['loss'])}, {t['tflops_per_device'] or 0:.1f} TFLOP/s, "
                         f"{t['precision']}, {t['optimizer'].removeprefix('optimizer: ').split(',')[0]}")
        if e:
            lines.append(f"  {m} export: max |logits diff| {e['max_abs_diff']:.1e} on {e['device']}")
    for kind, fig in (f.get("calibration") or {}).items():
        lines.append(f"  calibrate {kind}: one block at {fig['tflops']:.0f} TFLOP/s, kernel efficiency {fig['kernel_efficiency']:.0%}")
    for row in (f.get("mfu") or {}).get("rows", []):
        lines.append(f"  MFU {row['name']}: {row['mfu']:.1%} ({row['seconds_per_step']:.3f} s/step, peak {row['peak_gib']:.1f} GiB)")
    failed = [(k, c["detail"]) for k, c in rep["checks"].items() if not c["ok"]]
    lines += [f"  FAIL {k}: {d}" for k, d in failed[:8]]
    lines.append(f"  {len(rep['checks']) - len(failed)}/{len(rep['checks'])} checks passed; figures in {out / 'gpu-check.json'}, log in {out / 'gpu-check.log'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- stages run in their own process


def stage_versions() -> dict:
    from importlib.metadata import version

    import torch

    nvcc = shutil.which("nvcc")
    nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "transformers": version("transformers"), "deepspeed": version("deepspeed"), "tokenizers": version("tokenizers"), "nvcc": nv}


def stage_fused_adam() -> dict:
    from deepspeed.ops.op_builder import FusedAdamBuilder

    t0 = time.perf_counter()
    FusedAdamBuilder().load()
    return {"seconds": round(time.perf_counter() - t0, 1)}


def stage_parity(run: str, hf_dir: str, shards: str) -> dict:
    """Our model (the run's consolidated weights) and the export loaded by AutoModelForCausalLM on the same real token ids."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from clova_train.export.consolidate import consolidate_state_dict
    from clova_train.model.config import ModelConfig
    from clova_train.model.gpt import GPT
    from clova_train.shards.format import open_split

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(**json.loads((Path(run) / "config.json").read_text())["model"])
    ours = GPT(cfg).eval().to(dev)
    ours.load_state_dict(consolidate_state_dict(run))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval().to(dev)
    # The first 256 tokens of the training shards: real Korean text, as the tokenizer cut it.
    tokens = np.concatenate([np.asarray(ds[i]) for ds in open_split(shards) for i in range(len(ds))][:64])[:256]
    probe = torch.tensor(tokens.astype(np.int64)).view(2, 128).to(dev)
    with torch.no_grad():
        diff = (hf(probe).logits.float() - ours(probe).float()).abs().max().item()
    return {"max_abs_diff": diff, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "probe_tokens": int(probe.numel())}


STAGES = {"versions": stage_versions, "fused-adam": stage_fused_adam, "parity": stage_parity}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / ".gpu", help="the folder `make gpu-bundle` wrote (default .gpu)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"), help="figures and log (default $OUT, else gpu-check-out)")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole check; a stage past it is not run")
    p.add_argument("--rehearse-on-cpu", action="store_true", help="the same stages on the CPU with a tiny model (the CPU test)")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage:
        print(json.dumps(STAGES[a.stage](*a.args)))
        return 0
    why = cuda_problem(a.rehearse_on_cpu)
    if why:
        print(f"make gpu-check needs a CUDA device: {why}", file=sys.stderr)
        return 2
    why = bundle_problem(a.bundle)
    if why:
        print(f"make gpu-check needs the GPU bundle: {why}", file=sys.stderr)
        return 2
    return run_check(a.bundle, a.out, a.budget, a.rehearse_on_cpu)


if __name__ == "__main__":
    sys.exit(main())
