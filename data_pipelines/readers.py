"""Streaming readers: a source spec -> normalized records (records.py schemas), one at a time.

    items(source, data_cfg, counts) -> Item(key, where, record | None, error, split)

Files are read one at a time, line by line or (for a JSON array) element by element, so a
corpus never has to fit in memory. `key` orders records within a source (file index, then
position) and is the same on every run and in the Beam path. A record that does not fit its
format either stops the run with a UserError naming file and line (`data.on_bad_record=error`)
or comes back with `error` set, to be skipped and counted (`skip`). JSON arrays are parsed
incrementally; a syntax error inside one cannot be skipped past, so it always stops.
"""

import codecs
import dataclasses
import gzip
import json
from typing import Iterator

from data_pipelines import records, sources
from t5x_like.core.errors import UserError



def make_key(file_index: int, position: int, part: int = 0) -> int:
    """Order of a record within its source: file, position in the file, part of the record
    (a Self-Instruct task with several instances gives several records). Below 2**63."""
    return (file_index << 40) | (position << 8) | part


@dataclasses.dataclass
class Item:
    key: int
    where: str  # "path, line N": for messages and the report
    record: dict | None  # None when bad
    error: str = ""  # what is wrong with a bad record
    split: str = ""  # a split fixed by the source itself (synthetic); "" = by hash


def source_files(source: sources.Source) -> list[str]:
    return sources.expand_paths(source.path)


def items(source: sources.Source, data_cfg, counts: dict | None = None) -> Iterator[Item]:
    """Every record of a source; bad ones raise or come back marked (data.on_bad_record)."""
    if source.kind == "synthetic":
        yield from _synthetic(source.path, data_cfg)
        return
    if source.kind == "tfds":
        yield from _check(_tfds(source, data_cfg), data_cfg.on_bad_record)
        return
    for index, path in enumerate(source_files(source)):
        yield from file_items(source, path, index, data_cfg, counts)


def file_items(source: sources.Source, path: str, file_index: int, data_cfg,
               counts: dict | None = None) -> Iterator[Item]:
    """The records of one file of a file-based source (the Beam path reads files in parallel)."""
    utf8 = "repair" if data_cfg.clean.repair_utf8 else (
        "mark" if data_cfg.on_bad_record == "skip" else "strict")
    if source.kind == "text":
        raw = ((line, doc) for line, doc in sources.text_documents(
            path, data_cfg.text_unit, data_cfg.min_doc_chars, utf8, counts))
        parse = None
    else:
        raw = json_values(path, utf8, counts)
        parse = _PARSERS[source.kind]
    yield from _check(_items(raw, path, file_index, parse, source.field),
                      data_cfg.on_bad_record)


def _items(raw, path, file_index, parse, field):
    for position, (line, value) in enumerate(raw):
        where = f"{path}, line {line}"
        key = make_key(file_index, position)
        if isinstance(value, UserError):  # a line that is not UTF-8 or not JSON (skip mode)
            yield Item(key, where, None, str(value).split(": ", 1)[1])
            continue
        if parse is None:
            yield Item(key, where, {"text": value})
            continue
        try:
            got = parse(value, field)
        except records.BadRecord as e:
            yield Item(key, where, None, str(e))
            continue
        for part, record in enumerate(got if isinstance(got, list) else [got]):
            yield Item(make_key(file_index, position, part), where, record)


def _check(stream: Iterator[Item], on_bad_record: str) -> Iterator[Item]:
    for item in stream:
        if item.error and on_bad_record != "skip":
            raise UserError(f"{item.where}: {item.error}; fix or remove it, or set "
                            "data.on_bad_record=skip to skip and count such records.")
        yield item


_PARSERS = {
    "jsonl": lambda v, field: records.from_field(v, field),
    "json": lambda v, field: records.from_field(v, field),
    "alpaca": lambda v, field: records.from_alpaca(v),
    "chat": lambda v, field: records.from_chat(v, field or "messages"),
    "sgd": lambda v, field: records.from_sgd(v),
    "preference": lambda v, field: records.from_preference(v),
}


# ---------------------------------------------------------------------------------------------
# JSON: one object per line, or one array of objects, streamed.

_CHUNK = 1 << 20
_MAX_VALUE = 256 << 20  # a single JSON value larger than this is taken as a broken file


def json_values(path: str, utf8: str = "strict", counts: dict | None = None):
    """(line, value | UserError) for each JSON value of a JSON Lines file or a JSON array file.

    Lines that are not valid JSON come back as UserErrors (they can be skipped); an array is
    decoded incrementally and a syntax error in it raises (nothing after it can be trusted).
    """
    opener = gzip.open if path.endswith(".gz") else open
    encoding = sources.detect_encoding(path)
    try:
        with opener(path, "rb") as f:
            head = f.read(4096).decode(encoding, errors="ignore").lstrip("\ufeff \t\r\n")
    except (OSError, EOFError) as e:
        raise UserError(f"{path}, line 1: cannot read ({e}); is the file complete?") from None
    if head.startswith("["):
        yield from _json_array(path, utf8, counts, encoding)
        return
    for lineno, line in sources.iter_lines(path, utf8, counts):
        if isinstance(line, UserError):
            yield lineno, line
            continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, UserError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                                    f"{e.colno})")


def _json_array(path: str, utf8: str, counts: dict | None, encoding: str = "utf-8"):
    opener = gzip.open if path.endswith(".gz") else open
    wide = encoding not in ("utf-8", "utf-8-sig")
    errors = "t5x_like_cp1252" if utf8 == "repair" and not wide else "strict"
    decoder = json.JSONDecoder()
    with opener(path, "rb") as f:
        # utf-8-sig, utf-16 and utf-32 drop the byte-order mark themselves.
        text_decoder = codecs.getincrementaldecoder(encoding if wide else "utf-8-sig")(
            errors=errors)
        buf, pos, line, eof = "", 0, 1, False

        def fill():
            nonlocal buf, pos, eof
            try:
                chunk = f.read(_CHUNK)
                text = text_decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {line + buf.count(chr(10), pos)}: not valid "
                                f"{encoding.upper() if wide else 'UTF-8'} near byte {e.start}; "
                                "re-encode the file as UTF-8" + ("." if wide else " (or set "
                                "data.clean.repair_utf8=True).")) from None
            except (OSError, EOFError) as e:
                raise UserError(f"{path}, line {line}: cannot read ({e}); is the file "
                                "complete?") from None
            buf, pos, eof = buf[pos:] + text, 0, not chunk

        def skip_space():
            nonlocal pos, line
            while True:
                start = pos
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                line += buf.count("\n", start, pos)
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(message):
            raise UserError(f"{path}, line {line}: not a valid JSON array ({message}); a "
                            "broken array cannot be skipped past, so fix the file.")

        fill()
        skip_space()
        if buf[pos:pos + 1] != "[":
            fail("it does not start with '['")
        pos += 1
        skip_space()
        if buf[pos:pos + 1] == "]":
            return
        element = 0
        while True:
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > _MAX_VALUE:
                        line += buf.count("\n", pos, e.pos)
                        fail(e.msg)
                fill()  # the value may continue in the next chunk
            yield f"{line} (array element {element})", value
            element += 1
            line += buf.count("\n", pos, end)
            pos = end
            skip_space()
            sep = buf[pos:pos + 1]
            pos += 1
            if sep == "]":
                skip_space()
                if pos < len(buf):
                    fail("text after the closing ']'")
                return
            if sep != ",":
                fail("expected ',' or ']' after an element" if sep else "it ends too early")
            skip_space()


# ---------------------------------------------------------------------------------------------
# Sources without files.


def _synthetic(task: str, data_cfg) -> Iterator[Item]:
    from data_pipelines import synthetic

    n_valid = max(1, round(data_cfg.synthetic_docs * data_cfg.validation_fraction))
    for split, n, file_index in (("train", data_cfg.synthetic_docs, 0), ("validation", n_valid, 1)):
        for i in range(n):
            yield Item(make_key(file_index, i), f"synthetic {task} {split} {i}",
                       synthetic.record(task, i, split), split=split)


def _tfds(source: sources.Source, data_cfg) -> Iterator[Item]:
    """The `data.train_split` of a TFDS dataset (catalog or local), text in data.text_field."""
    import tensorflow_datasets as tfds

    name = source.path + (f"/{source.config}" if source.config else "") + (
        f":{source.version}" if source.version else "")
    try:
        builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
        split = builder.as_data_source()[data_cfg.train_split]
    except Exception as e:  # TFDS raises many types for unknown or unbuilt datasets
        raise UserError(f"config key 'data.source': TFDS dataset {name!r} (split "
                        f"{data_cfg.train_split!r}) is not available ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); build it first or set "
                        "data.tfds_data_dir.") from None
    field = data_cfg.text_field
    for i in range(len(split)):
        where = f"tfds:{name}[{data_cfg.train_split}] record {i}"
        value = split[i]
        if field not in value:
            yield Item(make_key(0, i), where, None, f"no feature {field!r} (set data.text_field)")
            continue
        text = value[field]
        yield Item(make_key(0, i), where,
                   {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)})
