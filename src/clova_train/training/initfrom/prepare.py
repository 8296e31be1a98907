"""Resolving ``--init-from`` before any rank starts: the model's shape from the source, its tokenizer relation, its hashes."""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig, pad_vocab
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.training.initfrom.graft import same_tokenizer
from clova_train.training.initfrom.loader import VOCAB_ROWS, graft_plan_for
from clova_train.training.initfrom.source import SourceInfo, WeightReader, check_tensors, hash_files, source_model_config, weight_files


def prepare_source(path: str | Path, tok: ClovaTokenizer, *, show: bool = True) -> tuple[ModelConfig, dict]:
    """(the run's ModelConfig, the source's record for RunSpec.init_from) of source directory ``path`` for tokenizer ``tok``.

    The shape is the source's; the vocabulary is the source's when ``tok`` is its
    own tokenizer, else ``tok``'s (padded), with the rows grafted. Every tensor
    is checked against the shape from the safetensors headers, and the weight
    files are hashed, before any rank starts.
    """
    src = Path(path).resolve()
    if not src.is_dir():
        raise ClovaError(f"{path}: --init-from needs a directory holding a Hugging Face model (config.json + safetensors)")
    files = weight_files(src)  # a pickle is refused here, by name, before config.json is even read
    source_cfg, _, digest = source_model_config(src)
    same = same_tokenizer(src, tok)
    graft = None
    if same:
        if tok.vocab_size > source_cfg.vocab_size:
            raise ClovaError(f"{src}: {source_cfg.vocab_size} embedding rows for the tokenizer's {tok.vocab_size} tokens")
        model = replace(source_cfg, name=src.name)
    else:
        model = replace(source_cfg, name=src.name, vocab_size=pad_vocab(tok.vocab_size))
        plan, _ = graft_plan_for(src, tok.path)
        graft = plan.counts(model.vocab_size)
    from clova_train.model.gpt import meta_model

    shapes = {n: tuple(p.shape) for n, p in meta_model(model).named_parameters()}
    check_tensors(WeightReader(src, source_cfg), shapes, grafted=() if same else VOCAB_ROWS)
    info = SourceInfo(path=str(src), arch=model.arch, config_sha256=digest, files=hash_files(src, files, show=show), same_tokenizer=same)
    return model, {**asdict(info), "graft": graft}


def check_model_section(model: ModelConfig, section: ModelConfig, where: str) -> None:
    """A config file's model section must describe the source's shape: --init-from decides it."""
    differ = [f.name for f in fields(ModelConfig) if f.name not in ("name", "lr") and getattr(model, f.name) != getattr(section, f.name)]
    if differ:
        f = differ[0]
        raise ClovaError(f"{where}: model.{f} is {getattr(section, f)!r} but the --init-from source has {getattr(model, f)!r}; "
                         "the source's config.json decides the model: drop the model section (or that field)")
