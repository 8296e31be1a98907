"""The GPT-3 decoder (single-device PyTorch) and the one table of model sizes.

The decoder's names load torch on first use, so the preset table (and the CLI's
argument checks over it) never wait for torch.
"""

from clova_train.model.config import PRESETS, ModelConfig, pad_vocab

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "flops_per_token", "num_params", "pad_vocab"]
_FROM = {"GPT": "gpt", "flops_per_token": "gpt", "num_params": "gpt", "KVCache": "cache"}


def __getattr__(name: str):
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"clova_train.model.{_FROM[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
