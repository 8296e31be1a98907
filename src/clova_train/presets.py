"""The one table of model sizes: HyperCLOVA's (paper Table 1) plus tiny test sizes.

Learning rates follow GPT-3's table by size (6e-4 at 125M down to 0.6e-4 at
175B); 39B sits between GPT-3's 13B and 175B rows. Adding a size is one row.
"""

from __future__ import annotations

from .model import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # Tiny sizes: seconds on a CPU, for tests and the demo.
        ModelConfig(name="tiny", n_layer=2, n_embd=64, n_head=4, block_size=256, lr=1e-3),
        ModelConfig(name="small", n_layer=4, n_embd=128, n_head=4, block_size=512, lr=1e-3),
        # The paper's sizes: layers / d_model / heads.
        ModelConfig(name="137m", n_layer=12, n_embd=768, n_head=16, lr=6.0e-4),
        ModelConfig(name="350m", n_layer=24, n_embd=1024, n_head=16, lr=3.0e-4),
        ModelConfig(name="760m", n_layer=24, n_embd=1536, n_head=16, lr=2.5e-4),
        ModelConfig(name="1.3b", n_layer=24, n_embd=2048, n_head=16, lr=2.0e-4),
        ModelConfig(name="6.9b", n_layer=32, n_embd=4096, n_head=32, lr=1.2e-4),
        ModelConfig(name="13b", n_layer=40, n_embd=5120, n_head=40, lr=1.0e-4),
        ModelConfig(name="39b", n_layer=48, n_embd=8192, n_head=64, lr=0.8e-4),
        ModelConfig(name="82b", n_layer=64, n_embd=10240, n_head=80, lr=0.6e-4),
    ]
}
