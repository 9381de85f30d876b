"""Data source specs (`data.source`) and the streaming readers behind them.

    synthetic:<task>                      the embedded demo task (synthetic.py), no files
    text:<path or glob>                   plain text (.txt or .gz); documents by data.text_unit
    jsonl:<path or glob>:<field>          one JSON object per line; the text is in <field>
    tfds:<name>[/<config>][:<version>]    a TFDS dataset (catalog or built locally)
    prepared:<dir>                        a folder written by `python -m data_pipelines.prepare`

Readers stream (a file at a time, a line at a time) and stop at the first bad record with one
sentence naming the file and line.
"""

import dataclasses
import glob
import gzip
import json
import os
from typing import Iterator

from t5x_like.errors import UserError

KINDS = ("synthetic", "text", "jsonl", "tfds", "prepared")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str
    path: str = ""  # text/jsonl: path or glob; synthetic: task name; tfds: dataset name
    field: str = ""  # jsonl: the JSON field holding the text
    config: str = ""  # tfds: builder config
    version: str = ""  # tfds: version

    @property
    def spec(self) -> str:
        return {"synthetic": f"synthetic:{self.path}", "text": f"text:{self.path}",
                "prepared": f"prepared:{self.path}",
                "jsonl": f"jsonl:{self.path}:{self.field}",
                "tfds": f"tfds:{self.path}" + (f"/{self.config}" if self.config else "")
                        + (f":{self.version}" if self.version else "")}[self.kind]


def parse_source(spec: str) -> Source:
    """'text:data/*.txt' -> Source(kind='text', path='data/*.txt'); bad specs name the fix."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise UserError(
            f"config key 'data.source': {spec!r} is not a data source; use synthetic:arithmetic, "
            "text:<path or glob>, jsonl:<path>:<field>, tfds:<name>[/<config>][:<version>] or "
            "prepared:<dir>.")
    if kind == "synthetic":
        from data_pipelines import synthetic
        if rest not in synthetic.TASKS:
            raise UserError(f"config key 'data.source': unknown synthetic task {rest!r}; "
                            f"choose one of {', '.join(synthetic.TASKS)}.")
        return Source("synthetic", path=rest)
    if kind in ("text", "prepared"):
        return Source(kind, path=rest)
    if kind == "jsonl":
        path, sep, field = rest.rpartition(":")
        if not sep or not path or not field:
            raise UserError(f"config key 'data.source': {spec!r} needs a field name, "
                            "e.g. jsonl:data/docs.jsonl:text.")
        return Source("jsonl", path=path, field=field)
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


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline); invalid UTF-8 stops with file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}, line {lineno}: not valid UTF-8 (byte "
                                    f"{raw[e.start]:#04x} at column {e.start + 1}); re-encode "
                                    "the file as UTF-8.") from None
                yield lineno, line.rstrip("\r\n")
    except (OSError, EOFError) as e:  # unreadable, truncated or corrupt .gz
        raise UserError(f"{path}, line {lineno + 1}: cannot read ({e}); is the file complete?"
                        ) from None


def read_text(paths: list[str], unit: str, min_doc_chars: int) -> Iterator[str]:
    """Documents from plain-text files.

    unit: "line" (each non-empty line), "paragraph" (blocks separated by blank lines) or
    "file" (the whole file). Consecutive units of one file are merged until a document has at
    least `min_doc_chars` characters, keeping context that a model should see together.
    """
    for path in paths:
        joiner = "\n" if unit == "line" else "\n\n"
        pending: list[str] = []
        size = 0
        for unit_text in _units(path, unit):
            pending.append(unit_text)
            size += len(unit_text)
            if size >= min_doc_chars:
                yield joiner.join(pending)
                pending, size = [], 0
        if pending:
            yield joiner.join(pending)


def _units(path: str, unit: str) -> Iterator[str]:
    if unit == "file":
        text = "\n".join(line for _, line in iter_lines(path)).strip("\n")
        if text.strip():
            yield text
        return
    block: list[str] = []
    for _, line in iter_lines(path):
        if unit == "line":
            if line.strip():
                yield line
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def read_jsonl(paths: list[str], field: str) -> Iterator[str]:
    """The string `field` of every JSON object line; a bad line stops with file and line."""
    for path in paths:
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                                f"{e.colno}); fix or remove the line.") from None
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
