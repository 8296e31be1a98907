"""What one GPU type can do: peak dense bf16, memory, the links a collective runs over, and how close big matmuls get to peak.

Bandwidths are per GPU, one direction, as the hardware is sold (NVLink/NVSwitch
inside a node; the network card each GPU has to other nodes: a DGX A100 gives
every GPU one HDR InfiniBand port of 200 Gb/s, 25 GB/s). What NCCL's ring
collectives reach of them is :data:`LINK_EFFICIENCY`; what matmuls reach of the
peak is the profile's ``kernel_efficiency``, which ``clova plan --calibrate``
measures on the GPU at hand and stores in :func:`calibration_file`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from clova_train.core.errors import ClovaError

# Large-message bus bandwidth NCCL's ring all-reduce/all-gather/reduce-scatter reaches of the line rate: nccl-tests
# report about 190 of 200 Gb/s per HDR port and about 230 of 300 GB/s on A100 NVSwitch. One figure for both links,
# set from the ZeRO-3 rows of the published-runs table (the only rows that are bandwidth-bound), not per row.
LINK_EFFICIENCY = 0.85

# Fraction of the dense bf16 peak that the matmuls of a transformer block reach, forward and backward, at the shapes
# of the published runs (Megatron-LM on A100: 44-52% of peak end to end, including its communication and bubble).
# Set once from the published-runs table (tests/test_plan_published.py); `clova plan --calibrate` measures it.
A100_KERNEL_EFFICIENCY = 0.58


@dataclass(frozen=True)
class GPUProfile:
    """One accelerator type as the planner sees it; every field can be overridden by a `clova plan` flag."""

    name: str
    peak_tflops: float
    """Dense bf16 peak, TFLOP/s."""
    memory_gb: float
    """Memory of one device, GiB (as nvidia-smi shows it)."""
    intra_node_gbps: float
    """Per-GPU bandwidth to the other GPUs of its node, GB/s one way (NVLink/NVSwitch, or PCIe without it)."""
    inter_node_gbps: float
    """Per-GPU bandwidth to other nodes, GB/s one way (the GPU's share of the node's network cards)."""
    kernel_efficiency: float = A100_KERNEL_EFFICIENCY
    """Fraction of peak the block's matmuls reach (measured by --calibrate; otherwise the A100 figure)."""


PROFILES: dict[str, GPUProfile] = {
    p.name: p
    for p in [
        # DGX A100: NVLink 3 through NVSwitch, 600 GB/s both ways; 8 x HDR 200 Gb/s per node.
        GPUProfile("a100", 312.0, 80.0, 300.0, 25.0),
        GPUProfile("a100-40", 312.0, 40.0, 300.0, 25.0),
        # DGX H100/H200: NVLink 4, 900 GB/s both ways; 8 x NDR 400 Gb/s per node.
        GPUProfile("h100", 989.0, 80.0, 450.0, 50.0),
        GPUProfile("h200", 989.0, 141.0, 450.0, 50.0),
        # PCIe cards without NVLink: PCIe 4 x16 between GPUs; a 100 Gb/s network per node shared by 8 (cloud nodes).
        GPUProfile("a10g", 125.0, 24.0, 25.0, 1.5),
        GPUProfile("l40s", 362.0, 48.0, 25.0, 12.5),
        GPUProfile("v100", 125.0, 32.0, 150.0, 12.5),
        # A CPU rank (`clova train` without a GPU): only the ranking matters, so round figures; memory is the host's.
        GPUProfile("cpu", 1.0, 16.0, 10.0, 1.0, kernel_efficiency=1.0),
    ]
}


def calibration_file() -> Path:
    """Where --calibrate stores measured kernel efficiencies: $CLOVA_CALIBRATION, else ~/.cache/clova/calibration.json."""
    env = os.environ.get("CLOVA_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "clova" / "calibration.json"


def measured_efficiency(gpu_type: str) -> float | None:
    """The kernel efficiency --calibrate measured for ``gpu_type``, if any (a broken file is named, not trusted)."""
    path = calibration_file()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        value = data[gpu_type]["kernel_efficiency"] if gpu_type in data else None
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError):
        raise ClovaError(f"{path}: not a calibration file written by `clova plan --calibrate`; delete it or rerun --calibrate") from None
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ClovaError(f"{path}: {gpu_type}.kernel_efficiency must be a number in (0, 1], not {value!r}; rerun --calibrate")
    return float(value)


def record_efficiency(gpu_type: str, efficiency: float, detail: dict) -> Path:
    """Store a measured kernel efficiency for ``gpu_type`` (other types' entries kept)."""
    from clova_train.core.files import atomic_write_json

    path = calibration_file()
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
    data[gpu_type] = {"kernel_efficiency": efficiency, **detail}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path


def profile(gpu_type: str, **overrides: float | None) -> GPUProfile:
    """The profile of ``gpu_type`` with the given fields replaced (None: keep); a measured efficiency replaces the default."""
    key = gpu_type.lower()
    if key not in PROFILES:
        raise ClovaError(f"unknown --gpu-type {gpu_type!r}; use one of {', '.join(PROFILES)} (or override its figures with --peak-tflops etc.)")
    base = PROFILES[key]
    measured = measured_efficiency(key)
    if measured is not None:
        base = replace(base, kernel_efficiency=measured)
    given = {k: v for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if v <= 0 or (k == "kernel_efficiency" and v > 1):
            raise ClovaError(f"{k.replace('_', '-')} must be positive{' and at most 1' if k == 'kernel_efficiency' else ''}, not {v}")
    return replace(base, **given)


def device_profile(device_name: str, unknown: str | None = "a100") -> str | None:
    """The profile key of a device name as torch reports it ("NVIDIA A100-SXM4-80GB" -> "a100"), "cpu" for CPU ranks.

    An unknown GPU gets ``unknown``: A100's by default, for the planner, whose ranking still holds with A100's times.
    """
    name = device_name.lower()
    if name == "cpu":
        return "cpu"
    for key in ("h200", "h100", "a100", "a10g", "l40s", "v100"):
        if key in name:
            return "a100-40" if key == "a100" and "40gb" in name else key
    return unknown
