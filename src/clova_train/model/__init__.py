"""The GPT-3 decoder (single-device PyTorch) and the one table of model sizes."""

from clova_train.model.config import PRESETS, ModelConfig, pad_vocab
from clova_train.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "pad_vocab"]
