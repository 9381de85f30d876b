"""Data source specs (`data.source`) and the streaming readers behind them.

    synthetic:<task>                      the embedded demo task (synthetic.py), no files
    text:<path or glob>                   plain text (.txt or .gz); documents by data.text_unit
    jsonl:<path or glob>:<field>          JSON objects (one per line or a JSON array), text in
                                          <field>; json:<path>:<field> is the same
    alpaca:<path or glob>                 {instruction, input, output} (or Self-Instruct
                                          {instruction, instances}) -> chat
    chat:<path or glob>[:<field>]         {<field>: [{role, content}, ...]} (default: messages)
    sgd:<path or glob>                    Schema-Guided-Dialogue {turns: [{speaker, utterance}]}
    preference:<path or glob>             {chosen, rejected} (hh-rlhf "\n\nHuman: ..." form) or
                                          {prompt, chosen, rejected} -> preference
    tfds:<name>[/<config>][:<version>]    a TFDS dataset (catalog or built locally)
    prepared:<dir>                        a folder written by `python -m data_pipelines.prepare`

Every file format may be gzipped (.gz); JSON files hold one object per line or one JSON array.
Readers stream (a file at a time, a line or array element at a time) and stop at the first bad
record with one sentence naming the file and line (readers.py can skip and count them instead).
"""

import codecs
import dataclasses
import glob
import gzip
import io
import os
import re
from typing import Iterator

from t5x_like.core import files
from t5x_like.core.errors import UserError

KINDS = ("synthetic", "text", "jsonl", "json", "alpaca", "chat", "sgd", "preference", "tfds",
         "prepared")
# The record kind (records.py) each source kind produces (synthetic: by task, see record_kind).
RECORD_KIND = {"text": "text", "jsonl": "text", "json": "text",
               "tfds": "text", "alpaca": "chat", "chat": "chat", "sgd": "chat",
               "preference": "preference"}


def record_kind(source: "Source") -> str:
    """The record kind (text | chat | preference) a source produces."""
    if source.kind == "synthetic":
        from data_pipelines import synthetic

        return synthetic.TASKS[source.path]
    return RECORD_KIND[source.kind]


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str
    path: str = ""  # files: path or glob; synthetic: task name; tfds: dataset name
    field: str = ""  # jsonl/json: the JSON field holding the text; chat: the messages field
    config: str = ""  # tfds: builder config
    version: str = ""  # tfds: version

    @property
    def spec(self) -> str:
        if self.kind in ("jsonl", "json") or (self.kind == "chat" and self.field):
            return f"{self.kind}:{self.path}:{self.field}"
        if self.kind == "tfds":
            return (f"tfds:{self.path}" + (f"/{self.config}" if self.config else "")
                    + (f":{self.version}" if self.version else ""))
        return f"{self.kind}:{self.path}"


def parse_source(spec: str) -> Source:
    """'text:data/*.txt' -> Source(kind='text', path='data/*.txt'); bad specs name the fix."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise UserError(
            f"config key 'data.source': {spec!r} is not a data source; use synthetic:arithmetic, "
            "text:<path or glob>, jsonl:<path>:<field>, alpaca:<path>, chat:<path>[:<field>], "
            "sgd:<path>, preference:<path>, tfds:<name>[/<config>][:<version>] or "
            "prepared:<dir>.")
    if kind == "synthetic":
        from data_pipelines import synthetic
        if rest not in synthetic.TASKS:
            raise UserError(f"config key 'data.source': unknown synthetic task {rest!r}; "
                            f"choose one of {', '.join(synthetic.TASKS)}.")
        return Source("synthetic", path=rest)
    if kind in ("text", "prepared", "alpaca", "sgd", "preference"):
        return Source(kind, path=rest)
    if kind in ("jsonl", "json"):
        path, sep, field = rest.rpartition(":")
        if not sep or not path or not field:
            raise UserError(f"config key 'data.source': {spec!r} needs a field name, "
                            f"e.g. {kind}:data/docs.jsonl:text.")
        return Source(kind, path=path, field=field)
    if kind == "chat":
        path, sep, field = rest.rpartition(":")
        if sep and path and re.fullmatch(r"\w+", field):
            return Source("chat", path=path, field=field)
        return Source("chat", path=rest)
    name, _, version = rest.partition(":")
    name, _, config = name.partition("/")
    return Source("tfds", path=name, config=config, version=version)


def expand_paths(pattern: str) -> list[str]:
    """Sorted files matching a path or glob; an empty match is a UserError."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise UserError(f"config key 'data.source': no file matches {pattern!r} "
                        f"(working directory {os.getcwd()}); check the path.")
    return paths


def _cp1252_bytes(error: UnicodeDecodeError):
    """Decodes the bytes that are not UTF-8 as Windows-1252 (a superset of Latin-1 for text):
    the usual cause is one Latin-1 or Windows file pasted into a UTF-8 one."""
    bad = error.object[error.start:error.end]
    return bad.decode("cp1252", errors="replace"), error.end


codecs.register_error("t5x_like_cp1252", _cp1252_bytes)


# Byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def detect_encoding(path: str) -> str:
    """The codec of a text file: "utf-8", or the one its byte-order mark names ("utf-8-sig",
    "utf-16", "utf-32"). Zero bytes without a mark (UTF-16/32 without one, or not text at all)
    are refused: read as UTF-8 they would become text of NULs, or mojibake such as "ÿþ"."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except (OSError, EOFError) as e:
        raise UserError(f"{path}, line 1: cannot read ({e}); is the file complete?") from None
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\x00" in head:
        raise UserError(f"{path}: has zero bytes but no byte-order mark (UTF-16 or UTF-32 without "
                        "one, or not a text file); re-encode it as UTF-8.")
    return "utf-8"


def iter_lines(path: str, utf8: str = "strict", counts: dict | None = None
               ) -> Iterator[tuple[int, "str | UserError"]]:
    """(line number, line without its newline) of a text or .gz file.

    UTF-8, with or without a byte-order mark; UTF-16 and UTF-32 files with one are decoded as
    such (lines counted in counts["from_utf16_32"]), and a decoding error in them stops.
    utf8: what a line that is not valid UTF-8 does. "strict": stops with a UserError naming
    file, line and byte; "repair": its bad bytes are read as Windows-1252 (counted in
    counts["utf8_repaired"]); "mark": the line comes back as the UserError, for the caller to
    skip and count.
    """
    encoding = detect_encoding(path)
    if encoding not in ("utf-8", "utf-8-sig"):
        yield from _iter_wide_lines(path, encoding, counts)
        return
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            if encoding == "utf-8-sig":
                f.read(len(codecs.BOM_UTF8))
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    error = UserError(f"{path}, line {lineno}: not valid UTF-8 (byte "
                                      f"{raw[e.start]:#04x} at column {e.start + 1}); re-encode "
                                      "the file as UTF-8 (or set data.clean.repair_utf8=True).")
                    if utf8 == "repair":
                        line = raw.decode("utf-8", errors="t5x_like_cp1252")
                        if counts is not None:
                            counts["utf8_repaired"] = counts.get("utf8_repaired", 0) + 1
                    elif utf8 == "mark":
                        yield lineno, error
                        continue
                    else:
                        raise error from None
                yield lineno, line.rstrip("\r\n")
    except (OSError, EOFError) as e:  # unreadable, truncated or corrupt .gz
        raise UserError(f"{path}, line {lineno + 1}: cannot read ({e}); is the file complete?"
                        ) from None


def _iter_wide_lines(path: str, encoding: str, counts: dict | None):
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding=encoding,
                                                         newline=None) as f:
            for lineno, line in enumerate(f, start=1):
                if counts is not None:
                    counts["from_utf16_32"] = counts.get("from_utf16_32", 0) + 1
                yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        # (decoded a chunk at a time: the bad bytes are at or after this line)
        raise UserError(f"{path}, line {lineno + 1} or after: not valid {encoding.upper()} "
                        f"({e.reason}) although its byte-order mark says so; re-encode the file "
                        "as UTF-8.") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}, line {lineno + 1}: cannot read ({e}); is the file complete?"
                        ) from None


def read_text(paths: list[str], unit: str, min_doc_chars: int) -> Iterator[str]:
    """Documents from plain-text files (see `text_documents`)."""
    for path in paths:
        for _, doc in text_documents(path, unit, min_doc_chars):
            yield doc


def text_documents(path: str, unit: str, min_doc_chars: int, utf8: str = "strict",
                   counts: dict | None = None) -> Iterator[tuple[int, "str | UserError"]]:
    """(first line number, document) of one plain-text file.

    unit: "line" (each non-empty line), "paragraph" (blocks separated by blank lines) or
    "file" (the whole file). Consecutive units of one file are merged until a document has at
    least `min_doc_chars` characters, keeping context that a model should see together.
    Bad lines (utf8="mark") come back as UserErrors between documents.
    """
    joiner = "\n" if unit == "line" else "\n\n"
    pending: list[str] = []
    size, first = 0, 0
    for lineno, unit_text in _units(path, unit, utf8, counts):
        if isinstance(unit_text, UserError):
            yield lineno, unit_text
            continue
        if not pending:
            first = lineno
        pending.append(unit_text)
        size += len(unit_text)
        if size >= min_doc_chars:
            yield first, joiner.join(pending)
            pending, size = [], 0
    if pending:
        yield first, joiner.join(pending)


def _units(path: str, unit: str, utf8: str, counts: dict | None):
    lines = iter_lines(path, utf8, counts)
    if unit == "file":
        kept = []
        for lineno, line in lines:
            if isinstance(line, UserError):
                yield lineno, line
            else:
                kept.append(line)
        text = "\n".join(kept).strip("\n")
        if text.strip():
            yield 1, text
        return
    block: list[str] = []
    start = 0
    for lineno, line in lines:
        if isinstance(line, UserError):
            yield lineno, line
        elif unit == "line":
            if line.strip():
                yield lineno, line
        elif line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield start, "\n".join(block)
            block = []
    if block:
        yield start, "\n".join(block)


def json_lines(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file (.gz too);
    a line that is not JSON stops with file and line."""
    return files.iter_jsonl(path, iter_lines(path))


def read_jsonl(paths: list[str], field: str) -> Iterator[str]:
    """The string `field` of every JSON object line; a bad line stops with file and line."""
    for path in paths:
        for lineno, record in json_lines(path):
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
                raise UserError(f"{path}, line {lineno}: no field {field!r} (fields: {keys}); "
                                "set the field in data.source, e.g. jsonl:path:text.")
            value = record[field]
            if not isinstance(value, str):
                raise UserError(f"{path}, line {lineno}: field {field!r} is "
                                f"{type(value).__name__}, not a string.")
            if value.strip():
                yield value
