"""Writing files and folders so that a reader never sees half of one; reading JSON lines.

Every write goes to a temporary name in the same folder (`<path>.tmp<pid>`), then `os.replace`
puts it under its name in one step: a crash, a full disk or a second reader sees the old file or
the new one, never a mix. A failed write removes its temporary.

JSON lines are read two ways: `iter_jsonl` / `read_jsonl` stop at a line that is not JSON with
one sentence naming file and line (user input, a results file), `read_jsonl_tolerant` skips it
(a metrics.jsonl being appended to, or cut short by a killed writer).
"""

import contextlib
import json
import os
import shutil
from typing import Any, Iterable, Iterator

from t5x_like.core.errors import UserError


def temp_path(path: str) -> str:
    """The name a write to `path` uses until it is complete: beside it, unique per process."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields the temporary name to write `path` under; renamed to `path` when the block ends,
    removed if it raises."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str, value: Any, *, indent: int | None = 2, **dumps_kwargs) -> None:
    """`value` as JSON plus a final newline; `dumps_kwargs` go to json.dumps (sort_keys, ...)."""
    atomic_write_text(path, json.dumps(value, indent=indent, **dumps_kwargs) + "\n")


def atomic_write_jsonl(path: str, records: Iterable[Any], **dumps_kwargs) -> int:
    """One JSON value per line; returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for n, record in enumerate(records, start=1):
            f.write(json.dumps(record, **dumps_kwargs) + "\n")
    return n


def atomic_copy(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def atomic_dir(out: str) -> Iterator[str]:
    """Yields an empty folder beside `out` to write into; renamed to `out` when the block ends
    (over an empty folder at most: callers refuse a non-empty one first), removed with its
    contents if it raises."""
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_jsonl(path: str, lines: Iterable[tuple[int, str]] | None = None
               ) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file; a line that is not
    JSON stops with a UserError naming file and line. `lines`: (number, text) pairs already
    read (e.g. decoded by data_pipelines.sources.iter_lines); default: the file as UTF-8."""
    if lines is None:
        lines = _numbered_lines(path)
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                            f"{e.colno}); fix or remove the line.") from None


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        yield from enumerate(f, start=1)


def read_jsonl(path: str) -> list[Any]:
    """Every value of a JSON-lines file (strict: see iter_jsonl)."""
    return [value for _, value in iter_jsonl(path)]


def read_jsonl_tolerant(path: str) -> list[Any]:
    """The values of a JSON-lines file as far as it is written: a line that is not JSON (the
    last one while a writer appends to it, or one a killed writer left torn) is skipped, and a
    missing file has none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    values = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return values
