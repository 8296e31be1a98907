"""The one table of precisions: our short names, torch's dtypes, and the long names transformers and `--dtype` use.

The names need no torch, so config checks (and the CLI's argument errors) answer
before torch loads; the dtypes load with torch on first use.
"""

from __future__ import annotations

PRECISIONS = ("bf16", "fp16", "fp32")
# config.json's torch_dtype, and what `clova generate/eval --dtype` accept.
LONG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def __getattr__(name: str):
    # TORCH_DTYPES: short name -> torch.dtype; BY_LONG_NAME: long name -> torch.dtype.
    if name in ("TORCH_DTYPES", "BY_LONG_NAME"):
        import torch

        torch_dtypes = {short: getattr(torch, long) for short, long in LONG_NAMES.items()}
        return torch_dtypes if name == "TORCH_DTYPES" else {LONG_NAMES[s]: d for s, d in torch_dtypes.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
