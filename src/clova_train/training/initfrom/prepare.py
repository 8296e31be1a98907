"""Resolving ``--init-from`` before any rank starts: the model's shape from the source, its tokenizer relation, its hashes."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from clova_train.core.config import from_dict
from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig, pad_vocab
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.training.initfrom.graft import same_tokenizer
from clova_train.training.initfrom.loader import VOCAB_ROWS, graft_plan_for
from clova_train.training.initfrom.source import (
    SourceInfo, WeightReader, check_tensors, fingerprint, hash_files, source_model_config, weight_files,
)


def prepare_source(path: str | Path, tok: ClovaTokenizer) -> tuple[ModelConfig, dict]:
    """(the run's ModelConfig, the source's record for RunSpec.init_from) of source directory ``path`` for tokenizer ``tok``.

    The shape is the source's; the vocabulary is the source's when ``tok`` is its
    own tokenizer, else ``tok``'s (padded), with the rows grafted. Every tensor
    is checked against the shape from the safetensors headers; the files are
    hashed whole later, once, by the pre-flight check (:func:`hash_source`).
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
    info = SourceInfo(path=str(src), arch=model.arch, config_sha256=digest, fingerprint=fingerprint(src, files), same_tokenizer=same)
    return model, {**asdict(info), "graft": graft}


def identity(init_from: dict) -> dict:
    """What makes two starts the same: the config, the weight files' sizes and headers, and the tokenizer relation."""
    return {k: init_from[k] for k in ("config_sha256", "fingerprint", "same_tokenizer")}


def hash_source(init_from: dict, resuming: bool, show: bool = True) -> None:
    """The pre-flight check's part (run once: by the launching process, or by rank 0 under srun): every weight file
    hashed whole into ``init_from["files"]``, compared with the hashes a resumed run recorded. A run that resumes
    from a checkpoint reads no weights from the source, so it keeps its record and reads nothing."""
    if resuming and init_from.get("files") is not None:
        return
    src = Path(init_from["path"])
    fresh = hash_files(src, sorted(init_from["fingerprint"]), show=show)
    old = init_from.get("files")
    if old is not None and old != fresh:
        name = next(f for f in sorted(set(old) | set(fresh)) if old.get(f) != fresh.get(f))
        raise ClovaError(f"{src / name} changed since the run recorded the source's hashes and it has no checkpoint yet; "
                         "point --init-from at the original source, or start a new --out")
    init_from["files"] = fresh


RECORD_KEYS = ("path", "arch", "config_sha256", "fingerprint", "files", "same_tokenizer", "graft")


def recorded_source(section, where: str) -> str:
    """The source path of a config file's init_from section (a run's config.json records it), read strictly."""
    if not isinstance(section, dict) or not isinstance(section.get("path"), str):
        raise ClovaError(f"{where}: init_from must be an object with a \"path\" (the Hugging Face model directory)")
    unknown = sorted(set(section) - set(RECORD_KEYS))
    if unknown:
        raise ClovaError(f"{where}: init_from: unknown key(s) {', '.join(unknown)}; accepted keys are {', '.join(RECORD_KEYS)}")
    return section["path"]


def check_unchanged(info: dict, section: dict, where: str) -> None:
    """On --resume: the source still has the files the run started from (else its checkpoints belong to another start)."""
    if section.get("config_sha256") not in (None, info["config_sha256"]):
        raise ClovaError(f"{info['path']}/config.json changed since {where} recorded it; point the run at the original "
                         "source (--init-from), or start a new --out")
    old = section.get("fingerprint")
    if isinstance(old, dict) and old != info["fingerprint"]:
        name = next((f for f in sorted(set(old) | set(info["fingerprint"])) if old.get(f) != info["fingerprint"].get(f)), "?")
        raise ClovaError(f"{info['path']}/{name} changed since {where} recorded the source; point the run at the "
                         "original source (--init-from), or start a new --out")
    info["files"] = section.get("files")  # the whole-file hashes: kept, or compared if the source is read again (hash_source)


# What the weights' shapes depend on: a config file or a flag cannot change these on a run from a source.
SHAPE_FIELDS = ("arch", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "vocab_size", "tie_embeddings", "qk_norm")


def run_model(model: ModelConfig, section: dict | None, given: dict, where: str) -> ModelConfig:
    """The run's model: the source's shape; the rest from a config file's model section (a resumed run's own
    config.json, whose context or RoPE base may have been changed) and then the flags, of which only --rope-theta
    may differ from the source (a context-extension stage); a shape that differs is one line naming the field."""
    if section is not None:
        shape = SHAPE_FIELDS + (("block_size",) if model.arch == "gpt3" else ())  # gpt3's positions are a table of weights
        f = next((f for f in shape if f in section and section[f] != getattr(model, f)), None)
        if f:
            raise ClovaError(f"{where}: model.{f} is {section[f]!r} but the --init-from source has {getattr(model, f)!r}; "
                             "the source's config.json decides the model's shape: drop the model section (or that field)")
        model = from_dict(ModelConfig, {**asdict(model), **{k: v for k, v in section.items() if k != "name"}}, where=where, section="model")
    for key, value in given.items():
        if key == "rope_theta":
            if model.arch != "llama":
                raise ClovaError(f"--rope-theta is for the llama block; the --init-from source is {model.arch}")
            model = replace(model, rope_theta=value)
        elif getattr(model, key) != value:
            raise ClovaError(f"--{key.replace('_', '-')} {value!r}: the --init-from source has {key} {getattr(model, key)!r}; "
                             "its config.json decides the model's shape: drop the flag")
    return model
