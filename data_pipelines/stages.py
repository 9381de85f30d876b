"""What the two preparation paths share (local: prepare.py; Apache Beam: beam_prepare.py): the
splits, the record stages after cleaning, batches that stop when a stop was asked for, and
interleaving and tokenizing the kept records.
"""

import itertools
from typing import Iterator

from data_pipelines import clean, dedup, sources
from data_pipelines import records as records_lib
from data_pipelines.interrupts import raise_if_interrupted

SPLITS = ("train", "validation")


def two_passes(source: sources.Source, kind: str, opts: dict) -> bool:
    """Repeated-line removal needs every document's lines counted before any is finished."""
    return kind == "text" and source.kind != "synthetic" and opts["repeated_line_fraction"] < 1


def finish_records(kind: str, opts: dict, batch: list, repeated) -> list:
    """Repeated lines out (`repeated`: their hashes, any container: the Beam path's come as a
    side input), filters, over-long documents split, exact keys and signatures of cleaned
    records (prepare._finish_batch describes what comes back)."""
    out, texts = [], []
    for record in batch:
        changed, removed = [], []
        if repeated and kind == "text":
            text, removed = clean.remove_lines(record["text"], repeated)
            if removed:
                changed.append("repeated_lines")
                record = {"text": clean.normalize_whitespace(text) if opts["whitespace"] else text}
                if not record["text"].strip():
                    out.append((changed, "repeated_lines", [], None, removed))
                    continue
        reason = clean.judge(record, kind, opts)
        if reason:
            out.append((changed, reason, [], None, removed))
            continue
        text = records_lib.text_view(record, kind)
        parts = clean.split_long(text, opts["max_doc_chars"]) if kind == "text" else [text]
        split_key = None
        if len(parts) > 1:
            changed.append("split_long")
            split_key = dedup.exact_key(text)
        pieces = []
        for part in parts:
            normalized = dedup.normalize(part)
            stored = records_lib.encode({"text": part} if len(parts) > 1 else record, kind)
            pieces.append((stored, dedup.exact_key(part, normalized), None))
            if normalized:
                texts.append((len(out), len(pieces) - 1, normalized))
        out.append((changed, "", pieces, split_key, removed))
    if texts and (opts["near"] or opts["decontaminate"]):
        sigs = dedup.signatures([t for _, _, t in texts], num_perm=opts["num_perm"],
                                seed=opts["seed"], ngram=opts["ngram"])
        for (i, j, _), sig in zip(texts, sigs):
            stored, ekey, _ = out[i][2][j]
            out[i][2][j] = (stored, ekey, sig)
    return out


def batches(item_iter, size: int = 256):
    while True:
        raise_if_interrupted()
        batch = list(itertools.islice(item_iter, size))
        if not batch:
            return
        yield batch


def round_robin(iterators: list[Iterator]) -> Iterator:
    """Interleaves sources so the tokenizer's character budget is shared among them."""
    active = list(iterators)
    while active:
        for it in list(active):
            value = next(it, None)
            if value is None:
                active.remove(it)
            else:
                yield value


def encode(tok, recs: list[dict], kind: str) -> list[tuple[list[int], dict]]:
    """Token ids of each record's text view (+ chosen/rejected token counts)."""
    texts = [records_lib.text_view(r, kind) for r in recs]
    ids = tok.encode_batch(texts)
    if kind != "preference":
        return [(i, {}) for i in ids]
    replies = tok.encode_batch([x for r in recs for x in (r["chosen"], r["rejected"])])
    return [(i, {"chosen": len(replies[2 * j]), "rejected": len(replies[2 * j + 1])})
            for j, i in enumerate(ids)]
