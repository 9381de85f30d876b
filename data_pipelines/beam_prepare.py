"""The preparation stages as an Apache Beam pipeline, run by TFDS inside the dataset builder.

    python -m data_pipelines.prepare --config=configs/data/<recipe>.py --out=<dir> \
        --config.data.runner=beam --config.data.beam_options="--runner=DirectRunner"

For corpora that do not fit one machine, the same command with a distributed runner, e.g.
"--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp" (input files and
--out on storage every worker reads, `pip install .[beam]` on the workers), or FlinkRunner /
SparkRunner. TFDS calls `BeamRecords._split_generators(dl_manager, pipeline)`
(tfds_builder.py), which applies `Prepare` once to the pipeline and cuts every
"<source>-<split>" split out of its output; ArrayRecord shards are written by TFDS's Beam writer.

The stages and their rules are those of the local path (prepare.py, dedup.py), so both keep
exactly the same records:

    read       one element per input file (files are read in parallel) -> records with their
               order key (source index, readers.make_key)
    clean      clean.clean_record + filters, exact key, MinHash signature (one DoFn)
    exact      GroupByKey(exact key): all but the first record (in order) are dropped
    near       one element per LSH band -> GroupByKey(band): within a band, a record is dropped
               if an earlier member is similar enough; the drops are joined back by order key.
               Bands are keys, so this works across any number of workers.
    split      from the exact key (or fixed by the source); then, with near dedup off, train
               records nearly duplicating a validation record are dropped (the same band join)
    tokens     min/max token filters, with the tokenizer given as data.tokenizer

Stage counts come back as Beam counters ("<source>/<stage>"). The tokenizer (unless given) is
trained, and statistics are gathered, by reading the written splits back afterwards.
"""

import os
import shlex
import time

import numpy as np

from data_pipelines import clean, dedup, readers, sources, stages, tfds_builder
from data_pipelines import records as records_lib
from t5x_like.core.errors import UserError

_NAMESPACE = "t5x_like"


def _counter(name: str):
    import apache_beam as beam

    return beam.metrics.Metrics.counter(_NAMESPACE, name)


def _read(task, data_cfg):
    """(source index, name, kind, source, file index, path) -> records with order keys."""
    s_index, name, kind, source, file_index, path = task
    if path is None:  # synthetic or tfds: one reader for the whole source
        stream = readers.items(source, data_cfg)
    else:
        stream = readers.file_items(source, path, file_index, data_cfg)
    for item in stream:
        yield {"s": s_index, "name": name, "kind": kind, "k": item.key, "record": item.record,
               "error": item.error, "split": item.split}


def _clean(element, opts, two_pass: frozenset):
    """The cleaning stages of one record; counts stages as Beam counters. Records of a source
    in `two_pass` (repeated-line removal) carry their line hashes to be counted."""
    name, kind = element["name"], element["kind"]
    _counter(f"{name}/read").inc()
    if element["error"]:
        _counter(f"{name}/bad").inc()
        return
    record = element.pop("record")
    text = records_lib.text_view(record, kind)
    _counter(f"{name}/input_bytes").inc(len(text.encode("utf-8")))
    if element["split"]:  # generated clean, split fixed by the source
        yield dict(element, stored=records_lib.encode(record, kind), ekey=None, hv=None)
        return
    cleaned, changed = clean.transform(record, kind, opts, clean.stage_functions(opts, kind))
    for stage in changed:
        _counter(f"{name}/changed/{stage}").inc()
    lines = []
    if element["s"] in two_pass:
        if records_lib.has_empty_part(cleaned, kind):
            _counter(f"{name}/empty").inc()
            return
        _counter(f"{name}/repeated/docs").inc()
        lines = clean.line_keys(cleaned["text"])
    yield dict(element, cleaned=cleaned, lines=lines)


def _repeated(entry, docs: dict, fraction: float, names):
    """((source, line hash), documents) -> the same when the line is repeated (clean.py)."""
    (s, key), n = entry
    if clean.repeated_lines({key: n}, docs.get(s, 0), fraction):
        _counter(f"{names[s]}/repeated/lines").inc()
        yield (s, key), n


class _SourceKeys:
    """The repeated-line hashes of one source, from the side input of all of them."""

    def __init__(self, repeated, s: int):
        self.repeated, self.s = repeated, s

    def __bool__(self) -> bool:
        return bool(self.repeated)

    def __contains__(self, key) -> bool:
        return (self.s, key) in self.repeated


def _finish(element, opts, repeated):
    """The local path's _finish_batch for one record: one element per kept piece."""
    if "cleaned" not in element:  # fixed split
        yield element
        return
    name, kind = element["name"], element["kind"]
    result = stages.finish_records(kind, opts, [element.pop("cleaned")],
                                    _SourceKeys(repeated, element["s"]))[0]
    changed, reason, pieces, split_key, removed = result
    for stage in changed:
        _counter(f"{name}/changed/{stage}").inc()
    if removed:
        _counter(f"{name}/repeated/removed").inc(len(removed))
    if reason:
        _counter(f"{name}/{reason}").inc()
        return
    if len(pieces) > 1:
        import apache_beam as beam

        _counter(f"{name}/long/docs").inc()
        _counter(f"{name}/long/pieces").inc(len(pieces))
        beam.metrics.Metrics.distribution(_NAMESPACE, f"{name}/long/largest_chars").update(
            sum(len(p[0]["text"]) for p in pieces))
    for part, (stored, ekey, sig) in enumerate(pieces):
        hv = None if sig is None else np.asarray(sig.hashvalues, np.uint32)
        split = ("validation" if dedup.in_validation(split_key or ekey,
                                                     opts["validation_fraction"]) else "train")
        yield dict(element, k=element["k"] + part, stored=stored, ekey=ekey, hv=hv,
                   split=split, lines=None)


def _order(element) -> tuple[int, int]:
    return element["s"], element["k"]


def _first_of_exact(group, names):
    """Keeps the earliest record of an exact-key group; counts the others."""
    _, members = group
    members = sorted(members, key=_order)
    for other in members[1:]:
        _counter(f"{other['name']}/exact").inc()
        _counter(f"{other['name']}/dup_of/{names[members[0]['s']]}").inc()
    yield members[0]


def _bands(element, threshold):
    if element["hv"] is None:
        return
    for band in dedup.band_keys(element["hv"], threshold):
        yield band, (_order(element), element["hv"])


def _near_drops(group, threshold):
    """(order, earliest similar earlier record's source) for each member to drop."""
    _, members = group
    members = sorted(members, key=lambda m: m[0])
    for i in range(1, len(members)):
        order, hv = members[i]
        for other_order, other_hv in members[:i]:
            if other_order != order and dedup.similarity(hv, other_hv) >= threshold:
                yield order, other_order
                break


def _contamination(group, threshold):
    """(train order, validation order) for train members nearly duplicating a validation one."""
    _, members = group
    valid = sorted((m for m in members if m[0] == "validation"), key=lambda m: m[1])
    for split, order, hv in members:
        if split != "train":
            continue
        for _, v_order, v_hv in valid:
            if dedup.similarity(hv, v_hv) >= threshold:
                yield order, v_order
                break


def _drop_marked(joined, names, stage):
    """CoGroupByKey result (order, {"e": [element], "d": [marks]}) -> element unless marked."""
    _, groups = joined
    elements, marks = groups["e"], groups["d"]
    for element in elements:
        if marks:
            other = min(marks)  # the earliest matching record, as the local path reports it
            _counter(f"{element['name']}/{stage}").inc()
            _counter(f"{element['name']}/dup_of/{names[other[0]]}").inc()
            continue
        yield element


class _TokenFilter:
    """min/max token counts with a given tokenizer, loaded once per worker."""

    def __init__(self, path, opts):
        self.path, self.opts, self.tok = path, opts, None

    def __call__(self, element):
        from data_pipelines import tokenizer as tokenizer_lib

        if self.tok is None:
            self.tok = tokenizer_lib.Tokenizer(self.path)
        kind = element["kind"]
        n = len(self.tok.encode(records_lib.text_view(
            records_lib.decode(element["stored"], kind), kind)))
        lo, hi = self.opts["min_tokens"], self.opts["max_tokens"]
        reason = "min_tokens" if lo and n < lo else "max_tokens" if hi and n > hi else ""
        if reason:
            _counter(f"{element['name']}/{reason}").inc()
            return []
        return [element]


def make_transform(named: dict, data_cfg, opts: dict, fields: tuple[str, ...]):
    """The PTransform (applied to the pipeline root) yielding (split, key, record)."""
    import apache_beam as beam

    names = list(named)
    threshold = opts["threshold"]
    tasks = []
    for s_index, (name, (source, _)) in enumerate(named.items()):
        kind = sources.record_kind(source)
        if source.kind in ("synthetic", "tfds"):
            tasks.append((s_index, name, kind, source, 0, None))
        else:
            tasks += [(s_index, name, kind, source, i, p)
                      for i, p in enumerate(readers.source_files(source))]

    two_pass = frozenset(s_index for s_index, (_, (source, _)) in enumerate(named.items())
                         if stages.two_passes(source, sources.record_kind(source), opts))
    opts = dict(opts, validation_fraction=data_cfg.validation_fraction)

    class Prepare(beam.PTransform):
        def expand(self, root):
            cleaned = (root
                       | "files" >> beam.Create(tasks, reshuffle=True)
                       | "read" >> beam.FlatMap(_read, data_cfg)
                       | "clean" >> beam.FlatMap(_clean, opts, two_pass))
            # Repeated lines: documents per source, documents per (source, line hash).
            docs = (cleaned
                    | "two-pass docs" >> beam.Filter(lambda e: e["s"] in two_pass
                                                     and "cleaned" in e)
                    | "docs source" >> beam.Map(lambda e: e["s"])
                    | "count docs" >> beam.combiners.Count.PerElement())
            repeated = (cleaned
                        | "line hashes" >> beam.FlatMap(lambda e: (
                            (e["s"], k) for k in e.get("lines") or ()))
                        | "count lines" >> beam.combiners.Count.PerElement()
                        | "repeated lines" >> beam.FlatMap(
                            _repeated, beam.pvalue.AsDict(docs),
                            opts["repeated_line_fraction"], names))
            kept = cleaned | "finish" >> beam.FlatMap(_finish, opts,
                                                      beam.pvalue.AsDict(repeated))
            fixed = kept | "fixed split" >> beam.Filter(lambda e: e["ekey"] is None)
            kept = kept | "hashed split" >> beam.Filter(lambda e: e["ekey"] is not None)
            if opts["exact"]:
                kept = (kept
                        | "by exact key" >> beam.Map(lambda e: (e["ekey"], e))
                        | "group exact" >> beam.GroupByKey()
                        | "first of exact" >> beam.FlatMap(_first_of_exact, names))
            if opts["near"] or opts["decontaminate"]:
                by_order = kept | "by order" >> beam.Map(lambda e: (_order(e), e))
                if opts["near"]:
                    marks = (kept
                             | "bands" >> beam.FlatMap(_bands, threshold)
                             | "group bands" >> beam.GroupByKey()
                             | "near drops" >> beam.FlatMap(_near_drops, threshold))
                    stage = "near"
                else:
                    marks = (kept
                             | "split bands" >> beam.FlatMap(lambda e: (
                                 (band, (e["split"], order, hv)) for band, (order, hv)
                                 in _bands(e, threshold)))
                             | "group split bands" >> beam.GroupByKey()
                             | "contamination" >> beam.FlatMap(_contamination, threshold))
                    stage = "contaminated"
                kept = ({"e": by_order, "d": marks}
                        | "join drops" >> beam.CoGroupByKey()
                        | "drop marked" >> beam.FlatMap(_drop_marked, names, stage))
            kept = (kept, fixed) | "all" >> beam.Flatten()
            if opts["min_tokens"] or opts["max_tokens"]:
                kept = kept | "tokens" >> beam.FlatMap(_TokenFilter(data_cfg.tokenizer, opts))
            return kept | "examples" >> beam.Map(lambda e: (
                f"{e['name']}-{e['split']}", e["k"],
                {f: e["stored"].get(f, "") for f in fields}))

    return Prepare()


def run(named: dict, data_cfg, opts: dict, tmp: str, fields: tuple[str, ...], report: dict,
        timing: dict, train_tokenizer):
    """Runs the Beam builder, then the tokenizer and statistics on what it wrote.

    Returns (dataset_dir, tokenizer, its origin); fills report (funnel, splits) and timing.
    """
    from data_pipelines import stats as stats_lib

    if (opts["min_tokens"] or opts["max_tokens"]) and not data_cfg.tokenizer:
        raise UserError("config key 'data.clean.min_tokens': with data.runner=beam, token-length "
                        "filters need a tokenizer before the pipeline runs; set data.tokenizer "
                        "(e.g. one prepared from a sample) or use data.runner=local.")
    names = list(named)
    split_names = [f"{n}-{s}" for n in names for s in stages.SPLITS]
    counters: dict[str, int] = {}

    def on_result(result):
        from apache_beam.metrics.metric import MetricsFilter

        metrics = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))
        for c in metrics["counters"]:
            value = c.committed if c.committed is not None else c.attempted
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
        for d in metrics["distributions"]:  # the largest split document, per source
            value = d.committed if d.committed is not None else d.attempted
            if value is not None and value.count:
                counters[d.key.metric.name] = max(counters.get(d.key.metric.name, 0),
                                                  int(value.max))

    start = time.perf_counter()
    try:
        dataset_dir = tfds_builder.build_beam(
            os.path.join(tmp, "tfds"), fields, split_names,
            lambda: make_transform(named, data_cfg, opts, fields), on_result,
            description=report.get("description") or "t5x_like prepared data (Beam)",
            beam_options=shlex.split(data_cfg.beam_options))
    except UserError:
        raise
    except Exception as e:  # a UserError raised inside a worker comes back wrapped
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UserError(str(cause)) from None
        raise
    timing["clean_dedup_s"] = time.perf_counter() - start
    for name in names:
        info = report["sources"][name]
        prefix = f"{name}/"
        for key, value in counters.items():
            if not key.startswith(prefix):
                continue
            stage = key[len(prefix):]
            if stage == "input_bytes":
                info["input_bytes"] = value
            elif stage.startswith("changed/"):
                info["changed"][stage[len("changed/"):]] = value
            elif stage.startswith("dup_of/"):
                info["duplicate_of"][stage[len("dup_of/"):]] = value
            elif stage.startswith("repeated/"):
                info["repeated_lines"][stage[len("repeated/"):]] = value
            elif stage.startswith("long/"):
                info["long_docs"][stage[len("long/"):]] = value
            else:
                info["funnel"][stage] = value

    splits = tfds_builder.data_sources(dataset_dir)
    kinds = {n: sources.record_kind(named[n][0]) for n in names}

    def decoded(name, split):
        source = splits.get(f"{name}-{split}")
        for i in range(len(source) if source is not None else 0):
            yield records_lib.decode(source[i], kinds[name])

    t = time.perf_counter()
    def train_texts(name):
        for rec in decoded(name, "train"):
            yield records_lib.text_view(rec, kinds[name])

    tok, origin = train_tokenizer(stages.round_robin([train_texts(n) for n in names]))
    timing["tokenizer_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = stats_lib.Stats(kinds, tok.vocab_size, tok.id_to_piece)
    for name in names:
        for split in stages.SPLITS:
            count = 0
            for batch in stages.batches(decoded(name, split)):
                start_tok = time.perf_counter()
                encoded = stages.encode(tok, batch, kinds[name])
                timing["tokenize_s"] += time.perf_counter() - start_tok
                for rec, (ids, parts) in zip(batch, encoded):
                    stats.add(name, split, rec, ids, parts)
                count += len(batch)
            report["sources"][name]["splits"][split] = count
    timing["write_s"] = time.perf_counter() - t - timing["tokenize_s"]
    timing["stats"] = stats
    return dataset_dir, tok, origin
