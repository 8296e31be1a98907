"""The GPT-3 decoder (single-device PyTorch) and the one table of model sizes.

``GPT`` and ``KVCache`` load on first use, so the preset table (and the CLI's
argument checks over it) never wait for torch.
"""

from clova_train.model.config import PRESETS, ModelConfig, pad_vocab

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "pad_vocab"]


def __getattr__(name: str):
    if name in ("GPT", "KVCache"):
        from clova_train.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
