"""Reading raw corpora: .txt, .jsonl (plain, .gz, .zst), .parquet and saved `datasets` dirs.

Every reader streams (never loads a whole file) and yields :class:`Document`
objects that know where they came from, so a bad document can be named by
file and line. Bad input either raises a one-line :class:`ClovaError` or, with
``on_error="skip"``, is counted by reason in a :class:`SkipCounts`; nothing is
dropped silently.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from clova_train.core.errors import ClovaError
from clova_train.core.textfiles import lone_surrogate, strip_bom

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
NORMALIZATIONS = ("NFC", "NFKC", "none")
ON_ERROR = ("raise", "skip")
DOC_SEPS = ("line", "blank")
# A `clova dedup` output dir: manifest.json with this format names its jsonl.zst parts in order.
DEDUP_FORMAT = "clova-dedup"
MANIFEST_NAME = "manifest.json"

# Control characters other than newline and tab carry no text and confuse
# downstream tools (a NUL ends a C string inside MeCab).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# (first byte, end byte, lines before the first byte) of a plain file: a worker's part of one input.
Span = tuple[int, int, int]


@dataclass(frozen=True)
class Document:
    """One document and where it came from."""

    text: str
    source: str
    where: str  # "line 12", "row 5", "split train row 7"
    fields: dict | None = None  # the row's other fields (its id, url, source...) that `clova dedup` keeps; see iter_documents


@dataclass
class SkipCounts:
    """Skipped documents counted by reason, with the first few locations of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, location: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(location)

    def merge(self, other: "SkipCounts") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            for loc in other.examples.get(reason, []):
                if len(ex) < self.max_examples:
                    ex.append(loc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }


def check_read_options(doc_sep: str, on_error: str, workers: int) -> None:
    """Validate the reading options every stage shares (tokenizer training and sharding)."""
    if doc_sep not in DOC_SEPS:
        raise ClovaError(f"doc_sep must be one of {', '.join(DOC_SEPS)}, not {doc_sep!r}")
    if on_error not in ON_ERROR:
        raise ClovaError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    if workers < 0:
        raise ClovaError(f"workers must be >= 0, not {workers}")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode normalisation shared by the tokenizer and the shard writer."""
    if form == "none":
        return text
    return unicodedata.normalize(form, text)


def strip_control(text: str) -> str:
    """Remove control characters except newline and tab."""
    return _CONTROL.sub("", text)


def clean(text: str, form: str = "NFC") -> str:
    """The one cleaning before tokens, for shards, tokenizer training and encoding alike (so a prompt meets
    the ids training saw): control characters but newline and tab out, then Unicode normalisation."""
    return normalize(strip_control(text), form)


def too_long(text: str, max_chars: int, source: str, where: str, on_error: str, skips: SkipCounts) -> bool:
    """--max-chars, as tokenize and dedup apply it: a longer document is bad input (raised, or counted as "too_long")."""
    if len(text) <= max_chars:
        return False
    if on_error == "raise":
        raise ClovaError(
            f"{source}: {where}: document of {len(text):,} characters is over --max-chars "
            f"{max_chars:,} (a missing line break or binary data?); raise the limit or pass --on-error skip"
        )
    skips.add("too_long", f"{source}:{where}")
    return True


def detect_format(path: Path) -> tuple[str, str | None]:
    """Return (format, compression) for an input path, or raise a clear error."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (
            path / "dataset_dict.json"
        ).exists():
            return "datasets", None
        raise ClovaError(
            f"{path}: is a directory but not one saved by `datasets` (no state.json or dataset_dict.json); "
            "pass the files inside it instead"
        )
    if not path.exists():
        raise ClovaError(f"{path}: no such file")
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSION:
        compression = COMPRESSION[suffixes[-1]]
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "txt", compression
    if last in JSONL_SUFFIXES:
        return "jsonl", compression
    if last == ".parquet" and compression is None:
        return "parquet", None
    raise ClovaError(
        f"{path}: unknown input format {''.join(path.suffixes) or '(no suffix)'}; "
        "use .txt, .jsonl (optionally .gz or .zst), .parquet, or a directory saved by `datasets`"
    )


def input_size(path: Path) -> int:
    """Bytes on disk of a file or a directory's files (for progress and manifests)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _open_binary(path: Path, compression: str | None) -> io.BufferedIOBase:
    raw = open(path, "rb")
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if compression == "zstd":
        return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
    return raw  # type: ignore[return-value]


class _ZstdStream(io.RawIOBase):
    """Zstandard frames decoded one after another, raising EOFError on a cut-off frame.

    zstandard's own stream reader ends quietly at a truncated frame, which
    would turn an interrupted download into silently lost documents.
    """

    def __init__(self, raw):
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd frame ends before its end marker")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._obj.decompress(chunk)
                if not self._obj.eof:
                    break
                self._in_frame = False
                chunk = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Reader:
    """Shared bookkeeping for one input: error policy, skip counting, locations."""

    def __init__(self, path: Path, on_error: str, skips: SkipCounts):
        if on_error not in ON_ERROR:
            raise ClovaError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
        self.path = path
        self.on_error = on_error
        self.skips = skips

    def bad(self, reason: str, where: str, message: str) -> None:
        """Raise, or count a skip, for one bad document."""
        if self.on_error == "raise":
            raise ClovaError(f"{self.path}: {where}: {message}; fix the input or pass --on-error skip")
        self.skips.add(reason, f"{self.path}:{where}")


def _lines(path: Path, compression: str | None, reader: _Reader, span: Span | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield (line number, byte offset, raw line) with decompression errors made readable; ``span``
    limits a plain file to the lines in one byte range."""
    f = _open_binary(path, compression)
    start, end, lineno = span if span is not None else (0, None, 0)
    offset = start
    try:
        try:
            head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
        except Exception:  # a corrupt stream: readline below reports it with a line number
            head = b""
        why = _binary_head(head)
        if why and start:
            return  # the range at offset 0 reports the file once
        if why:
            if reader.on_error == "raise":
                raise ClovaError(f"{path}: looks like a binary file ({why}); pass text, jsonl, parquet or a directory saved by `datasets`")
            reader.skips.add("binary_file", str(path))
            return
        if start:
            f.seek(start)
        while end is None or offset < end:
            try:
                line = f.readline()
            except Exception as e:  # EOFError/OSError from gzip, ZstdError from zstandard
                msg = f"compressed stream is truncated or corrupt after line {lineno} ({e})"
                if reader.on_error == "raise":
                    raise ClovaError(f"{path}: {msg}; re-download or re-compress the file, or pass --on-error skip") from None
                reader.skips.add("truncated_input", f"{path}:line {lineno + 1}")
                return
            if not line:
                return
            lineno += 1
            if lineno == 1:  # a byte-order mark is not text: dropped as every text input drops it
                bom = len(line) - len(line := strip_bom(line))
                offset += bom
            yield lineno, offset, line
            offset += len(line)
    finally:
        f.close()


_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"\xfd7zXZ\x00": "xz"}


def _binary_head(head: bytes) -> str | None:
    """Why the first bytes of a file say it is not text, or None. Most of its lines must decode as UTF-8."""
    if not head or head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # UTF-16 has NULs and odd bytes everywhere; its own error comes line by line
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return f"it starts like a {kind} file; give it its real extension"
    if head.count(b"\x00") > 16:
        return "NUL bytes in its first 8 KiB"
    lines = head.split(b"\n")
    complete, last = lines[:-1], lines[-1]
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad = sum(not _decodes(line) for line in complete)
    try:
        decoder.decode(last, final=False)  # the last line may be cut inside a character
    except UnicodeDecodeError:
        bad += 1
    total = len(complete) + (1 if last else 0)
    if total and bad * 2 > total:
        return f"{bad} of the {total} lines in its first 8 KiB are not UTF-8"
    return None


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _decode(raw: bytes, lineno: int, offset: int, reader: _Reader) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        reader.bad(
            "invalid_utf8",
            f"line {lineno}",
            f"invalid UTF-8 at byte {e.start} of the line (byte {offset + e.start} of the file)",
        )
        return None
    if "\x00" in text:
        reader.bad("nul_byte", f"line {lineno}", "NUL byte in text (binary data?)")
        return None
    return text


def _strip_eol(text: str) -> str:
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _iter_txt(path, compression, reader, doc_sep, span=None) -> Iterator[Document]:
    src = str(path)
    if doc_sep == "line":
        for lineno, offset, raw in _lines(path, compression, reader, span):
            text = _decode(raw, lineno, offset, reader)
            if text is None:
                continue
            text = _strip_eol(text)
            if text.strip():
                yield Document(text, src, f"line {lineno}")
        return
    # Blank-line separated: a document is a run of non-blank lines.
    buf: list[str] = []
    start = 0
    bad = False
    for lineno, offset, raw in _lines(path, compression, reader, span):
        text = _decode(raw, lineno, offset, reader)
        if text is None:
            bad = True  # the whole paragraph is skipped with its bad line
            text = "x"
        if _strip_eol(text).strip():
            if not buf:
                start = lineno
            buf.append(text)
            continue
        if buf and not bad:
            yield Document(_strip_eol("".join(buf)), src, f"line {start}")
        buf, bad = [], False
    if buf and not bad:
        yield Document(_strip_eol("".join(buf)), src, f"line {start}")


def _iter_jsonl(path, compression, reader, text_key, span=None) -> Iterator[Document]:
    src = str(path)
    for lineno, offset, raw in _lines(path, compression, reader, span):
        line = _decode(raw, lineno, offset, reader)
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            reader.bad("invalid_json", f"line {lineno}", f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict) or text_key not in obj:
            keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
            reader.bad("missing_text_key", f"line {lineno}", f"no {text_key!r} key (found: {keys}); set --text-key")
            continue
        text = obj[text_key]
        if not isinstance(text, str):
            reader.bad("text_not_string", f"line {lineno}", f"{text_key!r} is {type(text).__name__}, not a string")
            continue
        if "\x00" in text:
            reader.bad("nul_byte", f"line {lineno}", "NUL byte in text (binary data?)")
            continue
        if "\\u" in line and (at := lone_surrogate(text)):  # bad input here, not a crash in MeCab or a writer later
            reader.bad("lone_surrogate", f"line {lineno}", f"a lone surrogate ({at}) in {text_key!r}, which is not text")
            continue
        del obj[text_key]
        yield Document(text, src, f"line {lineno}", obj or None)


def _iter_rows(rows, columns, path, reader, text_key, prefix="") -> Iterator[Document]:
    if text_key not in columns:
        raise ClovaError(f"{path}: no column {text_key!r} (columns: {', '.join(columns)}); set --text-key")
    src = str(path)
    for i, row in enumerate(rows):
        text = row[text_key]
        where = f"{prefix}row {i}"
        if not isinstance(text, str):
            reader.bad("text_not_string", where, f"{text_key!r} is {type(text).__name__}, not a string")
            continue
        if "\x00" in text:
            reader.bad("nul_byte", where, "NUL byte in text (binary data?)")
            continue
        yield Document(text, src, where, {k: v for k, v in row.items() if k != text_key} or None)


def _iter_parquet(path, reader, text_key, fields) -> Iterator[Document]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        columns = list(ds.features) if ds.features is not None else None
    except Exception as e:
        raise ClovaError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    if columns is None:
        columns = [text_key]
    only_text = text_key in columns and not fields
    yield from _iter_rows(ds.select_columns([text_key]) if only_text else ds, columns, path, reader, text_key)


def _iter_saved(path, reader, text_key, fields) -> Iterator[Document]:
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ClovaError(f"{path}: cannot load with datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        parts = [(f"split {name} ", loaded[name]) for name in sorted(loaded)]
    else:
        parts = [("", loaded)]
    for prefix, ds in parts:
        columns = list(ds.column_names)
        if text_key in columns and not fields:
            ds = ds.select_columns([text_key])
        rows = (r for batch in ds.iter(batch_size=1024) for r in _unbatch(batch)) if text_key in columns else iter(())
        yield from _iter_rows(rows, columns, path, reader, text_key, prefix)


def _unbatch(batch: dict) -> Iterator[dict]:
    for i in range(len(next(iter(batch.values())))):
        yield {k: v[i] for k, v in batch.items()}


def iter_documents(
    path: str | Path,
    *,
    text_key: str = "text",
    doc_sep: str = "line",
    on_error: str = "raise",
    skips: SkipCounts | None = None,
    span: Span | None = None,
    fields: bool = False,
) -> Iterator[Document]:
    """Stream the documents of one input, raising or counting bad ones; ``span`` (from :func:`spans`, with
    the lines before it) reads one byte range of a plain text or jsonl file, numbering lines as the whole file does.
    A jsonl row's other fields always come along; parquet and `datasets` columns only with ``fields``."""
    path = Path(path)
    if doc_sep not in DOC_SEPS:
        raise ClovaError(f"doc_sep must be one of {', '.join(DOC_SEPS)}, not {doc_sep!r}")
    fmt, compression = detect_format(path)
    if span is not None and (fmt not in ("txt", "jsonl") or compression):
        raise ValueError(f"{path}: byte ranges need a plain .txt or .jsonl file")
    reader = _Reader(path, on_error, skips if skips is not None else SkipCounts())
    if fmt == "txt":
        return _iter_txt(path, compression, reader, doc_sep, span)
    if fmt == "jsonl":
        return _iter_jsonl(path, compression, reader, text_key, span)
    if fmt == "parquet":
        return _iter_parquet(path, reader, text_key, fields)
    return _iter_saved(path, reader, text_key, fields)


# A line holding only ASCII blanks: always a document break in --doc-sep blank, whatever the decoding.
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_LINE_END = re.compile(rb"\n")


def spans(path: Path, target: int, doc_sep: str = "line") -> list[tuple[int, int]]:
    """Byte ranges of about ``target`` bytes that together cover a file, each ending at a document
    boundary (a line end; a blank line with ``doc_sep="blank"``); one range for any input that cannot be
    split (compressed, parquet, datasets). Reads only near the cuts."""
    fmt, compression = detect_format(path)
    size = input_size(path)
    if fmt not in ("txt", "jsonl") or compression or size <= target:
        return [(0, size)]
    blank = doc_sep == "blank" and fmt == "txt"
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + target < size:
            pos = cuts[-1] + target - 1  # a cut right after a line ending at pos is allowed
            f.seek(pos)
            base, tail, cut = pos, b"", None
            while cut is None:
                block = f.read(1 << 16)
                if not block:
                    break
                tail += block
                m = (_BLANK_LINE if blank else _LINE_END).search(tail)
                if m:
                    cut = base + m.end()
                elif len(tail) > 1 << 17:  # keep a tail long enough for a break across blocks
                    base, tail = base + len(tail) - (1 << 16), tail[-(1 << 16):]
            if cut is None or cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def count_lines(path: Path, start: int, end: int) -> int:
    """Line ends in one byte range of a file (what lines before a :func:`spans` range need)."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def check_inputs(paths: list[str | Path]) -> list[Path]:
    """Resolve input paths, failing early (before any work) on a missing or unknown one."""
    if not paths:
        raise ClovaError("no input given; pass one or more .txt, .jsonl, .parquet files or saved `datasets` dirs")
    out = []
    for p in paths:
        p = Path(p)
        parts = dedup_parts(p)
        if parts is not None:
            out.extend(parts)
            continue
        detect_format(p)
        out.append(p)
    return out


def dedup_parts(path: Path) -> list[Path] | None:
    """The parts of a `clova dedup` output dir in order (so it is one input), or None for anything else."""
    manifest = path / MANIFEST_NAME
    if not path.is_dir() or not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != DEDUP_FORMAT:
        return None
    parts = []
    for rec in data.get("parts", []):
        name = rec.get("name") if isinstance(rec, dict) else None
        if not isinstance(name, str) or Path(name).name != name:
            raise ClovaError(f"{manifest}: part entry {rec!r} is not a file name inside the dir; re-run `clova dedup`")
        part = path / name
        if not part.is_file():
            raise ClovaError(f"{part}: listed in {manifest} but missing; re-run `clova dedup` into {path}")
        parts.append(part)
    return parts
