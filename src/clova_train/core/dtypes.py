"""The one table of precisions: our short names, torch's dtypes, and the long names transformers and `--dtype` use."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = tuple(TORCH_DTYPES)
# config.json's torch_dtype, and what `clova generate/eval --dtype` accept.
LONG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BY_LONG_NAME = {LONG_NAMES[short]: dtype for short, dtype in TORCH_DTYPES.items()}
