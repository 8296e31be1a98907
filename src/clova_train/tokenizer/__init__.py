"""The morpheme-aware byte-level BPE: MeCab-ko segmentation, encoding, training, and the remote-code file exports ship."""

from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

__all__ = ["ClovaTokenizer", "TokenizerConfig", "train_tokenizer"]
