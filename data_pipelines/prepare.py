"""Preparing data once: read -> clean -> filter -> dedup -> split -> tokenizer -> TFDS -> report.

    python -m data_pipelines.prepare --config=configs/data/shared_all.py --out=data/all
    python -m data_pipelines.prepare --config=configs/pretrain_tiny.py --out=data/shk \
        --config.data.source=text:../shared/data/pretrain/tinyshakespeare.txt

A recipe names one source (`data.source`) or several (`data.sources.<name> = {source, weight}`,
processed in name order). For each record, in order:

    readers.py   stream and normalize to the text / chat / preference schema (records.py);
                 a bad record stops the run naming file and line, or is skipped and counted
                 (data.on_bad_record)
    clean.py     cleaning stages; text sources: lines repeated across many documents out
                 (a first pass counts them), quality filters, over-long documents split
                 (data.clean.*)
    dedup.py     exact and MinHash near-duplicates across all sources; the split (train or
                 validation, data.validation_fraction) comes from a hash of the normalized
                 text, and no train record nearly duplicates a validation one (data.dedup.*)
    tokenizer    one SentencePiece model for all sources, trained on their train splits
    tfds         one TFDS ArrayRecord dataset; split "<source>-<train|validation>" per source;
                 token-length filters (data.clean.min_tokens / max_tokens) apply here
    stats.py     report.json, report.md and plots/ (counts per stage, lengths, roles, ...)

and writes

    <out>/prepare.json          sources (kind, weight, per-split counts), tokenizer, fingerprint
    <out>/tokenizer.model       (and tokenizer.vocab)
    <out>/tfds/records/1.0.0    the TFDS dataset
    <out>/report.md, report.json, plots/*.png

Training reads it with `--config.data.source=prepared:<out>`; pretraining mixes its text
sources by weight (grain), and `data.mixture="a=0.7,b=0.3"` overrides the weights. Training on
any other source prepares it the same way into `data.cache_dir`, keyed by a fingerprint of the
input files and settings, so reruns reuse it. The folder is written under a temporary name and
renamed when complete. `--out` must be new, empty, or an earlier output of the same recipe
(check_out); nothing else is ever deleted. SIGTERM / Ctrl-C remove the temporary folder
(stop_on_signals), and one left by a killed process is removed by the next preparation of the
same folder (remove_stale). report.md and the log warn about split documents, removed repeated
lines, and a document holding a large share of a source's tokens.

`data.num_workers` processes clean and hash records in parallel (order and output unchanged);
`data.runner=beam` runs the same stages as an Apache Beam pipeline inside the TFDS builder
(beam_prepare.py) for corpora beyond one machine.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Iterator

from absl import logging

# tfds_builder (TFDS) is imported where used: worker processes import this module for
# _process_batch and should not pay seconds of TFDS import each.
from data_pipelines import clean, dedup, readers, sources, synthetic
from data_pipelines.interrupts import Interrupted, raise_if_interrupted, stop_on_signals
from data_pipelines import records as records_lib
from data_pipelines import stages
from data_pipelines import stats as stats_lib
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import errors
from t5x_like.core import files as files_lib
from t5x_like.core.errors import UserError

FORMAT_VERSION = 2
TEXT_FIELD = "text"
# Stages that drop records, in order (the report's funnel columns).
STAGE_ORDER = ("bad", "empty", "repeated_lines", "chosen_is_rejected", "min_chars", "max_chars",
               "dup_lines", "dup_ngrams", "exact", "near", "contaminated", "min_tokens", "max_tokens")
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One source of a prepared folder."""

    kind: str  # text | chat | preference
    source: str  # the spec it was read from
    weight: float  # mixing weight recorded at preparation
    splits: dict[str, int]  # split -> records
    tfds_splits: dict[str, str]  # split -> TFDS split name ("<source>-<split>")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A dataset ready to read: where its splits are, which field, which tokenizer."""

    dataset_dir: str  # a TFDS dataset folder
    tokenizer_path: str
    text_field: str
    splits: dict[str, int]  # split -> records of the text sources data_source() mixes
    datasets: dict[str, Dataset] = dataclasses.field(default_factory=dict)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> mixing weight

    def data_source(self, split: str, kind: str = "text"):
        """Random-access source of one split: what grain's MapDataset.source takes.

        The `kind` sources with a weight above 0: one source is returned as is, several as a
        pipeline.Mixture, which make_dataset mixes by weight. Records hold exactly the fields
        of their kind (records.FIELDS), strings as bytes.
        """
        if not self.datasets:  # a TFDS dataset read in place
            if split not in self.splits:
                raise UserError(f"split {split!r} does not exist in {self.dataset_dir} (it has "
                                f"{', '.join(self.splits)}); set data.train_split / "
                                "data.eval_split.")
            from data_pipelines import tfds_builder

            return tfds_builder.data_sources(self.dataset_dir)[split]
        names = [n for n, d in self.datasets.items()
                 if d.kind == kind and self.weights.get(n, d.weight) > 0]
        if not names:
            raise UserError(f"{os.path.dirname(self.dataset_dir.rstrip('/'))} has no {kind} "
                            f"source with a weight above 0 (it has "
                            f"{', '.join(f'{n} ({d.kind})' for n, d in self.datasets.items())}); "
                            "check data.mixture.")
        missing = [n for n in names if split not in self.datasets[n].tfds_splits]
        if missing:
            raise UserError(f"split {split!r} does not exist for source {missing[0]} (splits are "
                            f"{', '.join(stages.SPLITS)}); set data.train_split / data.eval_split.")
        from data_pipelines import tfds_builder

        all_splits = tfds_builder.data_sources(self.dataset_dir)
        fields = records_lib.FIELDS[kind]
        parts = [_Fields(all_splits[self.datasets[n].tfds_splits[split]], fields)
                 for n in names]
        if len(parts) == 1:
            return parts[0].source if parts[0].exact else parts[0]
        from data_pipelines import pipeline

        return pipeline.Mixture(tuple(names), tuple(parts),
                                tuple(float(self.weights.get(n, self.datasets[n].weight))
                                      for n in names))


class _Fields:
    """A TFDS source whose records keep only `fields` (a dataset mixing kinds stores the union
    of their fields, the unused ones empty)."""

    def __init__(self, source, fields: tuple[str, ...]):
        self.source, self.fields = source, fields
        self.exact = tuple(source.dataset_info.features.keys()) == fields

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        return {f: record[f] for f in self.fields}

    def __getitems__(self, indices):
        return [{f: r[f] for f in self.fields} for r in self.source.__getitems__(indices)]


# ---------------------------------------------------------------------------------------------
# Settings.


def named_sources(data_cfg) -> dict[str, tuple[sources.Source, float]]:
    """{name: (source, weight)} in processing order: data.sources, or data.source alone."""
    entries = data_cfg.get("sources") or {}
    if not entries:
        source = sources.parse_source(data_cfg.source)
        return {source.kind: (source, 1.0)}
    out = {}
    for name in sorted(entries):
        entry = entries[name]
        try:
            out[name] = (sources.parse_source(entry["source"]), float(entry["weight"]))
        except UserError as e:
            raise UserError(str(e).replace("'data.source'", f"'data.sources.{name}.source'")
                            ) from None
    return out


def options(data_cfg) -> dict:
    """The cleaning and dedup settings as one plain dict (sent to worker processes)."""
    c, d = data_cfg.clean, data_cfg.dedup
    return {"html": c.html, "fix_text": c.fix_text, "unicode": c.unicode,
            "whitespace": c.whitespace, "boilerplate": c.boilerplate, "lowercase": c.lowercase,
            "stopwords": c.stopwords, "min_chars": c.min_chars, "max_chars": c.max_chars,
            "max_dup_line_fraction": c.max_dup_line_fraction,
            "max_dup_ngram_fraction": c.max_dup_ngram_fraction, "dup_ngram": c.dup_ngram,
            "min_tokens": c.min_tokens, "max_tokens": c.max_tokens,
            # .get: a config.json written before these keys existed reads as the defaults.
            "repeated_line_fraction": c.get("repeated_line_fraction", 0.3),
            "max_doc_chars": c.get("max_doc_chars", 100_000),
            "exact": d.exact, "near": d.near, "decontaminate": d.decontaminate,
            "threshold": d.threshold, "num_perm": d.num_perm, "ngram": d.ngram, "seed": d.seed}


def _check_options(opts: dict) -> None:
    """The keys t5x_like.config.validate does not know about."""
    if not 0.0 < opts["repeated_line_fraction"] <= 1.0:
        raise UserError(f"config key 'data.clean.repeated_line_fraction': is "
                        f"{opts['repeated_line_fraction']}; it must be in (0, 1] (1 = off).")
    if opts["max_doc_chars"] < 0:
        raise UserError(f"config key 'data.clean.max_doc_chars': is {opts['max_doc_chars']}; "
                        "it must be >= 0 (0 = no limit).")


def _special_tokens(data_cfg) -> list[str]:
    return [t.strip() for t in data_cfg.special_tokens.split(",") if t.strip()]


def fingerprint(named: dict, data_cfg) -> str:
    """Hash of everything the prepared data depends on (file sizes and mtimes, not contents)."""
    parts: dict = {"format": FORMAT_VERSION, "options": options(data_cfg),
                   "validation_fraction": data_cfg.validation_fraction,
                   "on_bad_record": data_cfg.on_bad_record,
                   "repair_utf8": data_cfg.clean.repair_utf8,
                   "tokenizer_type": data_cfg.tokenizer_type, "vocab_size": data_cfg.vocab_size,
                   "tokenizer_max_chars": data_cfg.tokenizer_max_chars,
                   "character_coverage": data_cfg.character_coverage,
                   "special_tokens": _special_tokens(data_cfg), "sources": {}}
    for name, (source, weight) in named.items():
        entry: dict = {"spec": source.spec, "weight": weight}
        if source.kind == "synthetic":
            entry["synthetic_docs"] = data_cfg.synthetic_docs
            entry["generator"] = synthetic.VERSION  # a changed task never reuses old data
        elif source.kind == "tfds":
            entry["tfds"] = (data_cfg.tfds_data_dir, data_cfg.train_split, data_cfg.text_field)
        else:
            entry["files"] = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
                              for p in sources.expand_paths(source.path)]
            if source.kind == "text":
                entry["text"] = (data_cfg.text_unit, data_cfg.min_doc_chars)
        parts["sources"][name] = entry
    if data_cfg.tokenizer:  # its main file and the config files beside it
        parts["tokenizer"] = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
                              for p in tokenizer_lib.files(data_cfg.tokenizer)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _slug(named: dict) -> str:
    if len(named) > 1:
        return "mix-" + "_".join(named)[:40]
    source = next(iter(named.values()))[0]
    base = os.path.basename(source.path.rstrip("/*")) or source.kind
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return f"{source.kind}-{keep}"


# ---------------------------------------------------------------------------------------------
# Entry points for training and the CLI.


def prepare(data_cfg, cache_dir: str) -> Prepared:
    """Prepares the configured sources (or finds them already prepared) and returns them."""
    source = sources.parse_source(data_cfg.source)
    if source.kind == "prepared":  # wins over data.sources: a recipe's output, trained on
        return load(source.path, data_cfg.get("mixture", ""))
    if source.kind == "tfds" and not data_cfg.get("sources"):
        return _prepare_tfds(source, data_cfg, cache_dir)
    named = named_sources(data_cfg)
    out = os.path.join(cache_dir, f"{_slug(named)}-{fingerprint(named, data_cfg)}")
    if not os.path.isfile(os.path.join(out, "prepare.json")):
        write_sources(named, data_cfg, out)
    return load(out, data_cfg.get("mixture", ""))


def write(source: sources.Source, data_cfg, out: str) -> dict:
    """Prepares a single source into `out` (see write_sources)."""
    return write_sources({source.kind: (source, 1.0)}, data_cfg, out)


def write_sources(named: dict[str, tuple[sources.Source, float]], data_cfg, out: str,
                  description: str = "") -> dict:
    """Builds the prepared folder `out` from named sources, atomically; returns the report.

    `out` may be new, an empty folder, or an earlier output of the same recipe (which is
    replaced); anything else is refused (check_out). The work happens in `<out>.tmp<pid>-<host>`
    beside it, renamed into place when complete; temporary folders that killed preparations
    left there are removed first (remove_stale).
    """
    for name, (source, _) in named.items():
        if not NAME_RE.fullmatch(name):
            raise UserError(f"config key 'data.sources.{name}': source names must be lower-case "
                            "letters, digits and underscores, starting with a letter.")
        if source.kind == "prepared":
            raise UserError(f"config key 'data.sources.{name}.source': {source.spec} is already "
                            "prepared; point training at it instead.")
    _check_options(options(data_cfg))
    out = os.path.realpath(out)
    recipe = fingerprint(named, data_cfg)
    check_out(out, recipe)
    remove_stale(out)
    tmp = f"{out}.tmp{os.getpid()}-{_host()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise _EnvironmentFailure(f"cannot create {tmp} ({e.strerror}); choose a --out folder "
                                  "in a writable place.") from None
    old = ""
    try:
        try:
            report = _build(named, data_cfg, tmp, description)
        except OSError as e:
            ours = str(e.filename or "").startswith(tmp) or e.errno in errors.DISK_FULL_ERRNOS
            if e.errno not in errors.ENVIRONMENT_ERRNOS or not ours:
                raise
            raise _EnvironmentFailure(
                f"cannot write {e.filename or tmp} ({e.strerror}); free some space or choose a "
                "--out folder in a writable place.") from None
        shutil.rmtree(os.path.join(tmp, "tfds", "downloads"), ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, "spool"), ignore_errors=True)
        raise_if_interrupted()  # the last moment a stop request can still keep `out` as it was
        if check_out(out, recipe) == "same":  # set aside, then removed once the new one is in
            old = f"{out}.old{os.getpid()}-{_host()}"
            os.rename(out, old)
        try:
            os.replace(tmp, out)  # also over an empty folder
        except OSError:
            if old:
                os.rename(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    for line in report.get("warnings", []):
        logging.warning("%s", line)
    return report


_EnvironmentFailure = getattr(errors, "EnvironmentFailure", UserError)


# What a preparation writes into its folder; a folder holding anything else is not its output.
OWN_ENTRIES = frozenset({"prepare.json", "tokenizer.model", "tokenizer.vocab", "tfds",
                         "report.md", "report.json", "plots", "tokenizer.json",
                         *tokenizer_lib.SIDECARS})


def check_out(out: str, recipe: str) -> str:
    """Whether a preparation may write the folder `out`: "new" (absent), "empty" (an empty
    folder) or "same" (an earlier output of the same recipe: same fingerprint, only prepare's
    own files). Anything else is refused with a UserError, never deleted.

    An earlier output of another recipe is refused too, although it is prepare's own: runs
    trained on `prepared:<out>` read it in place, and another recipe (tokenizer, splits)
    under the same path would silently change what they resume and evaluate on.
    """
    if not os.path.lexists(out):
        return "new"
    if not os.path.isdir(out):
        raise UserError(f"{out} is a file, not a folder; choose a new or empty folder for the "
                        "prepared data.")
    if out == os.path.realpath(os.getcwd()):
        raise UserError(f"{out} is the current folder; choose a new or empty folder for the "
                        f"prepared data, e.g. {os.path.join(out, 'data', 'prepared')}.")
    entries = set(os.listdir(out))
    if not entries:
        return "empty"
    meta = {}
    if "prepare.json" in entries:
        try:
            with open(os.path.join(out, "prepare.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
    if not isinstance(meta, dict) or "fingerprint" not in meta or not entries <= OWN_ENTRIES:
        raise UserError(f"{out} already exists and is not empty (nor a folder that "
                        "data_pipelines.prepare wrote); choose a new or empty folder: prepare "
                        "never deletes what it did not write.")
    if meta["fingerprint"] != recipe:
        raise UserError(f"{out} holds data prepared by another recipe, or from input files "
                        "that changed since; choose a new folder, or delete this one first if "
                        "nothing trains on it.")
    return "same"


@functools.cache
def _host() -> str:
    """This machine in temporary names: a preparation running on another machine that shares
    the folder is never taken for a dead one here."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale(out: str) -> list[str]:
    """Removes `<out>.tmp<pid>[-<host>]` and `<out>.old<pid>-<host>` folders beside `out` that
    a preparation killed on this machine left (its pid is not running); returns their paths.
    Folders of a running process, of another machine, or of any other name are left alone.
    """
    parent, base = os.path.split(out)
    pattern = re.compile(re.escape(base) + r"\.(?:tmp|old)(\d+)(?:-(.+))?")
    removed = []
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if (not m or (m.group(2) or _host()) != _host() or int(m.group(1)) == os.getpid()
                or _pid_alive(int(m.group(1))) or not os.path.isdir(path)
                or os.path.islink(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logging.info("Removed %d temporary folder(s) of interrupted preparations: %s",
                     len(removed), ", ".join(removed))
    return removed


def load(folder: str, mixture: str = "") -> Prepared:
    """Opens a prepared folder; `mixture` ("a=0.7,b=0.3") overrides the recorded weights."""
    meta_path = os.path.join(folder, "prepare.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{folder} is not a prepared dataset (no prepare.json); create it with "
                        "python -m data_pipelines.prepare.")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    dataset_dir = os.path.join(folder, meta["dataset_dir"])
    tokenizer_path = os.path.join(folder, meta["tokenizer"])
    if "datasets" not in meta:  # format 1: one text dataset with splits train/validation
        return Prepared(dataset_dir, tokenizer_path, meta["text_field"], meta["splits"])
    datasets = {n: Dataset(d["kind"], d["source"], d["weight"], d["splits"], d["tfds_splits"])
                for n, d in meta["datasets"].items()}
    weights = {n: d.weight for n, d in datasets.items()}
    weights.update(parse_mixture(mixture, datasets, folder))
    totals = collections.Counter()
    for n, d in datasets.items():
        if d.kind == "text" and weights[n] > 0:
            totals.update(d.splits)
    return Prepared(dataset_dir, tokenizer_path, TEXT_FIELD, dict(totals), datasets, weights)


def parse_mixture(spec: str, datasets: dict, folder: str) -> dict[str, float]:
    """"a=0.7, b=0.3" -> {"a": 0.7, "b": 0.3}; names must be sources of the folder."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or weight < 0:
            raise UserError(f"config key 'data.mixture': {part!r} is not name=weight (a number "
                            ">= 0), e.g. data.mixture='shakespeare=0.7,alpaca=0.3'.")
        if name not in datasets:
            raise UserError(f"config key 'data.mixture': {folder} has no source {name!r} (it has "
                            f"{', '.join(datasets)}).")
        out[name] = weight
    return out


# ---------------------------------------------------------------------------------------------
# The local path.


def _process_batch(kind: str, opts: dict, batch: list) -> list:
    """Worker side, one pass: clean, filter, split, hash and sign a batch of (key, record,
    error, split).

    Returns per record (changed stages, drop reason, pieces [(stored record, exact key,
    signature)], split key, removed lines, input bytes); see _finish_batch. Records with a
    fixed split (synthetic) are generated clean: passed through.
    """
    stages = clean.stage_functions(opts, kind)
    out, todo = [], []
    for key, record, error, split in batch:
        if error:
            out.append(([], "bad", [], None, [], 0))
            continue
        size = len(records_lib.text_view(record, kind).encode("utf-8"))
        if split:
            out.append(([], "", [(records_lib.encode(record, kind), None, None)], None, [], size))
            continue
        cleaned, changed = clean.transform(record, kind, opts, stages)
        out.append((changed, None, cleaned, None, [], size))
        todo.append(len(out) - 1)
    finished = _finish_batch(kind, opts, [out[i][2] for i in todo], "")
    for i, (changed, reason, pieces, split_key, removed) in zip(todo, finished):
        out[i] = (out[i][0] + changed, reason, pieces, split_key, removed, out[i][5])
    return out


def _clean_batch(kind: str, opts: dict, batch: list) -> list:
    """Worker side, first of two passes (text sources, repeated-line removal on): the cleaning
    stages. Per record of (key, record, error, split): (changed stages, drop reason, cleaned
    record, hashes of its lines, input bytes)."""
    stages = clean.stage_functions(opts, kind)
    out = []
    for _, record, error, _ in batch:
        if error:
            out.append(([], "bad", None, [], 0))
            continue
        size = len(records_lib.text_view(record, kind).encode("utf-8"))
        cleaned, changed = clean.transform(record, kind, opts, stages)
        if records_lib.has_empty_part(cleaned, kind):
            out.append((changed, "empty", None, [], size))
            continue
        out.append((changed, "", cleaned, clean.line_keys(cleaned["text"]), size))
    return out


@functools.lru_cache(maxsize=4)
def _load_keys(path: str) -> frozenset:
    import numpy as np

    return frozenset(int(k) for k in np.load(path)) if path else frozenset()


def _finish_batch(kind: str, opts: dict, batch: list, repeated_path: str) -> list:
    """Worker side: repeated lines out (the hashes saved at repeated_path), filters, over-long
    documents split, exact keys and signatures of cleaned records.

    Per record: (changed stages, drop reason, pieces [(stored record, exact key, signature)],
    split key (the whole document's exact key when it was split, so its pieces share a split),
    removed lines [(hash, line)]).
    """
    return stages.finish_records(kind, opts, batch,
                          _load_keys(repeated_path) if kind == "text" else frozenset())


class _Workers:
    """Ordered parallel map with a bounded number of batches in flight (so reading never
    runs ahead of processing by more than a few batches); in-process when n == 0."""

    def __init__(self, n: int):
        self.n = n
        self.pool = None
        if n:
            # spawn, not fork: this may run inside a JAX process (training), which must not fork.
            self.pool = concurrent.futures.ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            if threading.current_thread() is threading.main_thread():
                # Start every worker now (a submit spawns one while none is idle) with SIGINT
                # ignored, which they inherit: a Ctrl-C while one still imports then prints no
                # traceback of it. The parent ignores SIGINT only for these few milliseconds.
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    for _ in range(n):
                        self.pool.submit(int)
                finally:
                    signal.signal(signal.SIGINT, previous)

    def map(self, fn, args_iter: Iterator) -> Iterator:
        if not self.pool:
            for args in args_iter:
                yield fn(*args)
            return
        pending = collections.deque()
        for args in args_iter:
            pending.append(self.pool.submit(fn, *args))
            if len(pending) >= 3 * self.n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the preparation and cleans up;
    # workers without this would each print a KeyboardInterrupt traceback. (Not SIGTERM: the
    # executor stops the workers of a broken pool with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mapped(workers: "_Workers", fn, items: Iterator, args) -> Iterator[tuple]:
    """(item, result) for every item, `fn(*args(batch))` returning one result per item."""
    in_flight: collections.deque = collections.deque()

    def work():
        for batch in stages.batches(items):
            in_flight.append(batch)
            yield args(batch)

    for results in workers.map(fn, work()):
        yield from zip(in_flight.popleft(), results)


def _spool_path(spool: str, name: str, split: str) -> str:
    return os.path.join(spool, f"{name}-{split}.jsonl")


class _Cleaned(collections.namedtuple("_Cleaned", "key where record")):
    """A record between the two passes (readers.Item's fields that _take reads)."""

    error, split = "", ""


def _run_local(named: dict, data_cfg, opts: dict, spool: str, report: dict) -> None:
    """Read, clean, dedup and split every source into spool/<name>-<split>.jsonl."""
    deduper = dedup.Deduper(exact=opts["exact"], near=opts["near"],
                            decontaminate=opts["decontaminate"], threshold=opts["threshold"],
                            num_perm=opts["num_perm"], seed=opts["seed"])
    names = list(named)
    workers = _Workers(data_cfg.num_workers)
    try:
        for s_index, (name, (source, _)) in enumerate(named.items()):
            kind = sources.record_kind(source)
            info = report["sources"][name]
            read_counts: dict = {}
            stream = readers.items(source, data_cfg, read_counts)
            files = {split: open(_spool_path(spool, name, split), "w", encoding="utf-8")
                     for split in stages.SPLITS}

            def take(item, result, s_index=s_index, info=info, files=files):
                changed, reason, pieces, split_key, removed = result
                _count(info, changed, reason, removed)
                if reason:
                    if reason == "bad" and len(info["bad_examples"]) < 5:
                        info["bad_examples"].append(f"{item.where}: {item.error}")
                    return
                if len(pieces) > 1:
                    _count_split(info, item.where, pieces)
                _take(item, pieces, split_key, s_index, names, deduper, data_cfg, info, files)

            try:
                if stages.two_passes(source, kind, opts):
                    repeated_path = _first_pass(workers, stream, kind, opts, spool, name, info,
                                                take)
                    cleaned = _spooled_cleaned(spool, name, kind)
                    for item, result in _mapped(workers, _finish_batch, cleaned, lambda b: (
                            kind, opts, [it.record for it in b], repeated_path)):
                        take(item, result)
                    os.remove(_spool_path(spool, name, "cleaned"))
                else:
                    for item, result in _mapped(workers, _process_batch, stream, lambda b: (
                            kind, opts, [(it.key, it.record, it.error, it.split) for it in b])):
                        _count_input(info, result[5])
                        take(item, result[:5])
            finally:
                for f in files.values():
                    f.close()
            for key in ("utf8_repaired", "from_utf16_32"):  # lines, counted by the readers
                if read_counts.get(key):
                    info["changed"][key] = read_counts[key]
        if deduper.decontaminate:
            _decontaminate(named, deduper, spool, report)
    finally:
        workers.close()


def _count_input(info: dict, size: int) -> None:
    info["funnel"]["read"] += 1
    info["input_bytes"] += size


def _count(info: dict, changed: list[str], reason: str, removed: list) -> None:
    for stage in changed:
        info["changed"][stage] = info["changed"].get(stage, 0) + 1
    if reason:
        info["funnel"][reason] = info["funnel"].get(reason, 0) + 1
    if removed:
        rep = info["repeated_lines"]
        rep["removed"] += len(removed)
        for key, line in removed:
            rep["examples"].setdefault(key, line)


def _count_split(info: dict, where: str, pieces: list) -> None:
    long_docs = info["long_docs"]
    chars = sum(len(records_lib.text_view(records_lib.decode(p[0], "text"), "text"))
                for p in pieces)
    long_docs["docs"] += 1
    long_docs["pieces"] += len(pieces)
    if chars > long_docs["largest_chars"]:
        long_docs["largest_chars"], long_docs["largest"] = chars, where


def _first_pass(workers, stream, kind: str, opts: dict, spool: str, name: str, info: dict,
                take) -> str:
    """Cleans a text source into spool/<name>-cleaned.jsonl, counting in how many documents
    each line occurs; saves the hashes of the repeated ones and returns that file's path.
    Memory: one counter entry per distinct line of the source (about 100 bytes each); the
    Beam path counts with a combiner instead."""
    counts: collections.Counter = collections.Counter()
    docs = 0
    with open(_spool_path(spool, name, "cleaned"), "w", encoding="utf-8") as f:
        for item, (changed, reason, cleaned, keys, size) in _mapped(
                workers, _clean_batch, stream,
                lambda b: (kind, opts, [(it.key, it.record, it.error, it.split) for it in b])):
            _count_input(info, size)
            if reason:
                take(item, (changed, reason, [], None, []))
                continue
            _count(info, changed, "", [])
            counts.update(keys)
            docs += 1
            f.write(json.dumps({"k": item.key, "w": item.where, "r": cleaned["text"]},
                               ensure_ascii=False) + "\n")
    import numpy as np

    repeated = clean.repeated_lines(counts, docs, opts["repeated_line_fraction"])
    info["repeated_lines"].update(lines=len(repeated), docs=docs, counts={
        k: counts[k] for k in sorted(repeated, key=lambda k: (-counts[k], k))[:5]})
    path = os.path.join(spool, f"{name}-repeated.npy")
    np.save(path, np.asarray(sorted(repeated), np.uint64))
    _load_keys.cache_clear()  # in-process: an earlier preparation may have used this path
    return path


def _spooled_cleaned(spool: str, name: str, kind: str) -> Iterator[_Cleaned]:
    for _, entry in files_lib.iter_jsonl(_spool_path(spool, name, "cleaned")):
        yield _Cleaned(entry["k"], entry["w"], {"text": entry["r"]})


def _take(item, pieces, split_key, s_index, names, deduper, data_cfg, info, files):
    """Main-process side of one kept record (or its pieces): dedup, split, spool."""
    funnel, dup_of = info["funnel"], info["duplicate_of"]
    for part, (stored, ekey, sig) in enumerate(pieces):
        key = item.key + part  # pieces of a text record: its key's free part byte
        if item.split:
            split = item.split
        else:
            split = ("validation" if dedup.in_validation(split_key or ekey,
                                                         data_cfg.validation_fraction)
                     else "train")
            verdict, other = deduper.offer((s_index, key), s_index, ekey, sig,
                                           split == "validation")
            if verdict:
                funnel[verdict] = funnel.get(verdict, 0) + 1
                dup_of[names[other]] = dup_of.get(names[other], 0) + 1
                continue
        line = {"k": key, "r": stored, "w": item.where}
        if deduper.decontaminate and split == "train" and sig is not None:
            line["s"] = sig.hashvalues.tolist()
        files[split].write(json.dumps(line, ensure_ascii=False) + "\n")


def _decontaminate(named: dict, deduper, spool: str, report: dict) -> None:
    """Near dedup is off: drop train records that nearly duplicate any validation record."""
    import numpy as np

    names = list(named)
    for name in named:
        info = report["sources"][name]
        path = _spool_path(spool, name, "train")
        with files_lib.atomic_path(path) as new, open(new, "w", encoding="utf-8") as dst:
            for _, entry in files_lib.iter_jsonl(path):
                sig = (dedup.lean(np.asarray(entry.pop("s"), np.uint32), deduper.seed)
                       if "s" in entry else None)
                other = deduper.contaminated(sig)
                if other >= 0:
                    funnel, dup_of = info["funnel"], info["duplicate_of"]
                    funnel["contaminated"] = funnel.get("contaminated", 0) + 1
                    dup_of[names[other]] = dup_of.get(names[other], 0) + 1
                    continue
                dst.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _spooled(spool: str, name: str, split: str) -> Iterator[tuple[int, dict, str]]:
    """(key, stored record, where it was read) of each spooled record."""
    for _, entry in files_lib.iter_jsonl(_spool_path(spool, name, split)):
        yield entry["k"], entry["r"], entry.get("w", "")


def _spooled_texts(spool: str, name: str, kind: str) -> Iterator[str]:
    for _, stored, _ in _spooled(spool, name, "train"):
        yield records_lib.text_view(records_lib.decode(stored, kind), kind)


# ---------------------------------------------------------------------------------------------
# Shared by both paths: tokenizer, writing with token filters and statistics, the report.


class _Writer:
    """Per split: token-length filter, statistics, and the stored record with all fields."""

    def __init__(self, tok, stats: stats_lib.Stats, opts: dict, fields: tuple[str, ...],
                 report: dict, timing: dict):
        self.tok, self.stats, self.opts, self.fields = tok, stats, opts, fields
        self.report, self.timing = report, timing

    def records(self, name: str, kind: str, split: str, entries: Iterator[tuple[int, dict]]):
        info = self.report["sources"][name]
        for batch in stages.batches(entries):
            recs = [records_lib.decode(stored, kind) for _, stored, _ in batch]
            start = time.perf_counter()
            encoded = stages.encode(self.tok, recs, kind)
            self.timing["tokenize_s"] += time.perf_counter() - start
            for (key, stored, where), rec, (ids, parts) in zip(batch, recs, encoded):
                n, lo, hi = len(ids), self.opts["min_tokens"], self.opts["max_tokens"]
                reason = "min_tokens" if lo and n < lo else "max_tokens" if hi and n > hi else ""
                if reason:
                    info["funnel"][reason] = info["funnel"].get(reason, 0) + 1
                    continue
                info["splits"][split] = info["splits"].get(split, 0) + 1
                # The pieces of one input record share its key but for the part byte.
                self.stats.add(name, split, rec, ids, parts, doc=key >> 8, where=where)
                yield key, {f: stored.get(f, "") for f in self.fields}


def _train_tokenizer(named: dict, data_cfg, train_texts: Iterator[str], path: str):
    if data_cfg.tokenizer:  # a .model, a tokenizer.json (with its config files), a folder
        path = tokenizer_lib.install(data_cfg.tokenizer, os.path.dirname(path))
        return tokenizer_lib.load(path), "given: " + data_cfg.tokenizer
    tok = tokenizer_lib.train(train_texts, path, vocab_size=data_cfg.vocab_size,
                              model_type=data_cfg.tokenizer_type,
                              max_chars=data_cfg.tokenizer_max_chars,
                              character_coverage=data_cfg.character_coverage,
                              special_tokens=_special_tokens(data_cfg))
    return tok, f"trained on the train splits of {', '.join(named)}"


def _new_report(named: dict, data_cfg, opts: dict, description: str) -> dict:
    return {
        "description": description, "runner": data_cfg.runner,
        "num_workers": data_cfg.num_workers, "options": opts, "stage_order": list(STAGE_ORDER),
        "lsh": list(dedup.lsh_params(opts["threshold"], opts["num_perm"])),
        "decontamination": ("near-duplicate removal across all records and splits implies it."
                            if opts["near"] else
                            "train records that nearly duplicate a validation record are dropped."
                            if opts["decontaminate"] else
                            "OFF (data.dedup.near and data.dedup.decontaminate are both off)."),
        "sources": {name: {"source": source.spec, "kind": sources.record_kind(source),
                           "weight": weight, "funnel": {"read": 0}, "changed": {},
                           "duplicate_of": {}, "bad_examples": [], "input_bytes": 0,
                           "splits": {},
                           "repeated_lines": {"lines": 0, "docs": 0, "removed": 0,
                                              "examples": {}, "counts": {}},
                           "long_docs": {"docs": 0, "pieces": 0, "largest_chars": 0,
                                         "largest": ""}}
                    for name, (source, weight) in named.items()},
    }


def _build(named: dict, data_cfg, tmp: str, description: str) -> dict:
    opts = options(data_cfg)
    report = _new_report(named, data_cfg, opts, description)
    kinds = {name: sources.record_kind(source) for name, (source, _) in named.items()}
    fields = tuple(f for kind in records_lib.KINDS if kind in kinds.values()
                   for f in records_lib.FIELDS[kind])
    tok_path = os.path.join(tmp, "tokenizer.model")
    timing = {"tokenize_s": 0.0}
    start = time.perf_counter()
    if data_cfg.runner == "beam":
        from data_pipelines import beam_prepare

        dataset_dir, tok, origin = beam_prepare.run(named, data_cfg, opts, tmp, fields, report,
                                                    timing, lambda texts: _train_tokenizer(
                                                        named, data_cfg, texts, tok_path))
        stats = timing.pop("stats")
    else:
        spool = os.path.join(tmp, "spool")
        os.makedirs(spool)
        _run_local(named, data_cfg, opts, spool, report)
        _check_counts(named, report, spooled=spool)
        timing["clean_dedup_s"] = time.perf_counter() - start
        t = time.perf_counter()
        tok, origin = _train_tokenizer(named, data_cfg, stages.round_robin([
            _spooled_texts(spool, n, kinds[n]) for n in named]), tok_path)
        timing["tokenizer_train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = stats_lib.Stats(kinds, tok.vocab_size, tok.id_to_piece)
        writer = _Writer(tok, stats, opts, fields, report, timing)
        splits = {f"{n}-{split}": (lambda n=n, split=split: writer.records(
                      n, kinds[n], split, _spooled(spool, n, split)))
                  for n in named for split in stages.SPLITS}
        try:
            from data_pipelines import tfds_builder

            dataset_dir = tfds_builder.build(os.path.join(tmp, "tfds"), fields, splits,
                                             description=description or "t5x_like prepared data")
        except AssertionError as e:  # TFDS refuses an empty split: the token filter emptied it
            if "No examples were yielded" not in str(e):
                raise
            _check_counts(named, report)
            raise
        timing["write_s"] = time.perf_counter() - t - timing["tokenize_s"]
    _check_counts(named, report)
    total_s = time.perf_counter() - start
    mb = sum(s["input_bytes"] for s in report["sources"].values()) / 1e6
    report["throughput"] = {
        "input_mb": round(mb, 3), "clean_dedup_s": round(timing["clean_dedup_s"], 3),
        "clean_dedup_mb_per_s": round(mb / max(timing["clean_dedup_s"], 1e-9), 3),
        "tokenizer_train_s": round(timing["tokenizer_train_s"], 3),
        "tokenize_s": round(timing["tokenize_s"], 3),
        "tokenize_mb_per_s": round(mb / max(timing["tokenize_s"], 1e-9), 3),
        "write_s": round(timing["write_s"], 3), "total_s": round(total_s, 3),
        "total_mb_per_s": round(mb / max(total_s, 1e-9), 3)}
    summary = stats.summary()
    report["stats"] = summary
    for info in report["sources"].values():
        rep = info["repeated_lines"]
        examples, counts = rep.pop("examples", {}), rep.pop("counts", {})
        rep["top"] = [{"line": examples.get(k, ""), "docs": n} for k, n in counts.items()]
    report["warnings"] = _warnings(report, summary)
    report["tokenizer"] = {
        "type": data_cfg.tokenizer_type, "vocab_size": tok.vocab_size, "origin": origin,
        "character_coverage": data_cfg.character_coverage,
        "special_tokens": _special_pieces(tok, data_cfg),
        "bytes_per_token_validation": {
            n: round(s["validation"]["bytes"]["total"] / max(s["validation"]["tokens"]["total"], 1),
                     4) for n, s in summary.items() if "validation" in s}}
    report["mixture"] = _mixture(report, summary)
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint(named, data_cfg),
            "dataset_dir": os.path.relpath(dataset_dir, tmp),
            "tokenizer": os.path.relpath(tok.path, tmp),
            "text_field": TEXT_FIELD, "fields": list(fields),
            "splits": dict(sum((collections.Counter(report["sources"][n]["splits"])
                                for n in named if kinds[n] == "text"), collections.Counter())),
            "datasets": {n: {"kind": kinds[n], "source": named[n][0].spec, "weight": named[n][1],
                             "splits": report["sources"][n]["splits"],
                             "tfds_splits": {s: f"{n}-{s}" for s in stages.SPLITS}}
                         for n in named}}
    with open(os.path.join(tmp, "prepare.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    if data_cfg.report:
        stats_lib.write(tmp, report, stats)
    return report


# A document holding this share of a source's train tokens, and more than LOUD_DOC_FAIR times
# its fair share (1 / documents), gets a warning: one file or dump dominating a source.
LOUD_DOC_SHARE = 0.05
LOUD_DOC_FAIR = 10


def _warnings(report: dict, summary: dict) -> list[str]:
    """Sentences for what changed or skews the data beyond the usual: printed as warnings and
    listed first in report.md."""
    opts, out = report["options"], []
    for name, info in report["sources"].items():
        long_docs, rep = info["long_docs"], info["repeated_lines"]
        if long_docs["docs"]:
            longest = (f" (the longest: {long_docs['largest_chars']:,} characters"
                       + (f", {long_docs['largest']}" if long_docs.get("largest") else "") + ")"
                       if long_docs.get("largest_chars") else "")
            out.append(
                f"source {name}: {long_docs['docs']:,} document(s) longer than "
                f"data.clean.max_doc_chars={opts['max_doc_chars']:,} characters were split into "
                f"{long_docs['pieces']:,} pieces{longest}; set data.clean.max_chars to drop "
                "such documents instead.")
        if rep["removed"]:
            top = rep["top"][0] if rep["top"] else None
            emptied = info["funnel"].get("repeated_lines", 0)
            out.append(
                f"source {name}: removed {rep['removed']:,} occurrences of {rep['lines']:,} "
                f"line(s) found in more than {opts['repeated_line_fraction']:.0%} of its "
                f"{rep['docs']:,} documents (data.clean.repeated_line_fraction)"
                + (f", e.g. {top['line'][:80]!r} in {top['docs']:,}" if top else "")
                + (f"; {emptied:,} documents held nothing else and were dropped" if emptied
                   else "") + ".")
        largest = summary.get(name, {}).get("train", {}).get("largest_document")
        docs = summary.get(name, {}).get("train", {}).get("documents", 0)
        if largest and largest["share"] >= LOUD_DOC_SHARE and largest["share"] * docs > (
                LOUD_DOC_FAIR):
            pieces = f", {largest['records']} pieces" if largest["records"] > 1 else ""
            out.append(
                f"source {name}: one document ({largest['where'] or 'a record'}{pieces}) holds "
                f"{largest['share']:.1%} of its train tokens ({largest['tokens']:,} tokens; "
                f"{docs:,} train documents in all); check it, or drop such documents with "
                "data.clean.max_chars.")
    return out


def _special_pieces(tok, data_cfg) -> list[str]:
    """Control pieces (pad, unk, bos, eos), then the chat markers and data.special_tokens."""
    from data_pipelines import chat_template

    out = [tok.id_to_piece(i) for i in sorted(tok.special_ids)[:8]]
    return out + [t for t in (*chat_template.MARKERS, *_special_tokens(data_cfg))
                  if tok.piece_to_id(t) is not None and t not in out]


def _mixture(report: dict, summary: dict) -> dict:
    """Expected share of records and tokens of each weighted source in its kind's mixture."""
    src = report["sources"]
    out = {}
    for kind in records_lib.KINDS:
        weighted = {n: s["weight"] for n, s in src.items() if s["kind"] == kind and s["weight"] > 0}
        total_w = sum(weighted.values())
        if not total_w:
            continue
        mean_tokens = {n: summary.get(n, {}).get("train", {}).get("tokens", {}).get("mean", 0)
                       for n in weighted}
        token_mass = {n: w / total_w * mean_tokens[n] for n, w in weighted.items()}
        total_t = sum(token_mass.values()) or 1
        for n, w in weighted.items():
            out[n] = {"kind": kind, "weight": w, "record_share": round(w / total_w, 4),
                      "token_share": round(token_mass[n] / total_t, 4),
                      "epochs_per_million": round(1e6 * w / total_w
                                                  / max(src[n]["splits"].get("train", 0), 1), 2)}
    return out


def _check_counts(named: dict, report: dict, spooled: str = "") -> None:
    """Every source must keep train and validation records; say why when one did not."""
    for name, (source, _) in named.items():
        info = report["sources"][name]
        if spooled:
            counts = {}
            for split in stages.SPLITS:
                with open(_spool_path(spooled, name, split), encoding="utf-8") as f:
                    counts[split] = sum(1 for _ in f)
        else:
            counts = {split: info["splits"].get(split, 0) for split in stages.SPLITS}
        funnel = info["funnel"]
        where = f"config key 'data.source': {source.spec}" if len(named) == 1 else (
            f"config key 'data.sources.{name}': {source.spec}")
        if not funnel["read"]:
            raise UserError(f"{where} produced no records; is it empty (or all blank lines)?")
        if not counts["train"] and not counts["validation"]:
            dropped = ", ".join(f"{k} {v}" for k, v in funnel.items() if k != "read" and v)
            first_bad = (f" (first bad one: {info['bad_examples'][0]})"
                         if info["bad_examples"] else "")
            raise UserError(f"{where} kept none of its {funnel['read']} records ({dropped})"
                            f"{first_bad}; check the source and data.clean settings.")
        if not counts["validation"]:
            raise UserError(
                f"{where} gave {counts['train']} records and none for validation; raise "
                "data.validation_fraction or lower data.min_doc_chars.")
        if not counts["train"]:
            raise UserError(f"{where} gave no train records; lower data.validation_fraction.")


# ---------------------------------------------------------------------------------------------
# TFDS datasets read in place (data.source=tfds:... for training).


def _prepare_tfds(source: sources.Source, data_cfg, cache_dir: str) -> Prepared:
    """A TFDS dataset is read in place; only its tokenizer may need training (cached)."""
    import tensorflow_datasets as tfds

    name = source.path + (f"/{source.config}" if source.config else "") + (
        f":{source.version}" if source.version else "")
    try:
        builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
    except Exception as e:  # TFDS raises many types for unknown or unbuilt datasets
        raise UserError(f"config key 'data.source': TFDS dataset {name!r} is not available "
                        f"({type(e).__name__}: {str(e).splitlines()[0]}); build it first or set "
                        "data.tfds_data_dir.") from None
    if not builder.is_prepared():
        raise UserError(f"config key 'data.source': TFDS dataset {name!r} is not prepared in "
                        f"{builder.data_dir}; this machine cannot download it, so run "
                        "download_and_prepare where it can and copy the folder here.")
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    if data_cfg.text_field not in builder.info.features:
        raise UserError(f"config key 'data.text_field': {name!r} has no feature "
                        f"{data_cfg.text_field!r} (it has {', '.join(builder.info.features)}).")
    prepared = Prepared(str(builder.data_dir), "", data_cfg.text_field, splits)
    if data_cfg.tokenizer:
        return dataclasses.replace(prepared, tokenizer_path=tokenizer_lib.resolve(
            data_cfg.tokenizer))
    key = hashlib.sha256(json.dumps([name, str(builder.data_dir), data_cfg.text_field,
                                     data_cfg.train_split, data_cfg.vocab_size,
                                     data_cfg.tokenizer_type, data_cfg.tokenizer_max_chars,
                                     data_cfg.character_coverage, data_cfg.special_tokens]
                                    ).encode()).hexdigest()[:16]
    tok_path = os.path.join(cache_dir, f"tfds-{source.path}-{key}", "tokenizer.model")
    if not os.path.isfile(tok_path):
        os.makedirs(os.path.dirname(tok_path), exist_ok=True)
        train = prepared.data_source(data_cfg.train_split)
        texts = (_as_text(train[i][data_cfg.text_field]) for i in range(len(train)))
        tokenizer_lib.train(texts, tok_path, vocab_size=data_cfg.vocab_size,
                            model_type=data_cfg.tokenizer_type,
                            max_chars=data_cfg.tokenizer_max_chars,
                            character_coverage=data_cfg.character_coverage,
                            special_tokens=_special_tokens(data_cfg))
    return dataclasses.replace(prepared, tokenizer_path=tok_path)


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def main(argv):
    from absl import flags

    from t5x_like.core import config as config_lib

    del argv
    out = os.path.abspath(flags.FLAGS.out)
    cfg = flags.FLAGS.config
    config_lib.validate(cfg)
    config_file = getattr(flags.FLAGS["config"], "config_filename", "")
    try:
        with stop_on_signals():
            report = write_sources(named_sources(cfg.data), cfg.data, out,
                                   description=f"Prepared by `python -m data_pipelines.prepare "
                                               f"--config={config_file}`.")
    except Interrupted as e:
        # 128 + the signal: what a shell or scheduler expects of a job that a signal stopped
        # (the work is not done, so not 0; nor 1, which reads as a crash).
        logging.flush()
        print(f"error: interrupted by {signal.Signals(e.signum).name}; {out} was not written "
              "and the partial preparation was removed.", file=sys.stderr)
        sys.exit(128 + e.signum)
    prepared = load(out)
    t = report["throughput"]
    print(json.dumps({
        "out": out, "tokenizer": prepared.tokenizer_path,
        "sources": {n: {"kind": d.kind, "splits": d.splits} for n, d in prepared.datasets.items()},
        "report": os.path.join(out, "report.md") if cfg.data.report else None,
        "mb_per_s": {"clean_dedup": t["clean_dedup_mb_per_s"],
                     "tokenize": t["tokenize_mb_per_s"], "total": t["total_mb_per_s"]}},
        indent=2))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from t5x_like.core import cli

    config_flags.DEFINE_config_file("config", None, "Config file with a `data` section.")
    flags.DEFINE_string("out", None, "Folder to write the prepared dataset to.", required=True)
    cli.run(main)
