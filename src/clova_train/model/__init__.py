"""The GPT-3 decoder (single-device PyTorch) and the one table of model sizes."""

from clova_train.model.config import PRESETS, ModelConfig, pad_vocab
from clova_train.model.cache import KVCache
from clova_train.model.gpt import GPT, flops_per_token, num_params

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "flops_per_token", "num_params", "pad_vocab"]
