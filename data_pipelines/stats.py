"""Balance and bias report of a prepared dataset: report.json, report.md and PNG plots.

What a user should see before spending compute on the data, per source and split:

    funnel        records read -> bad -> each cleaning filter -> exact / near duplicates ->
                  contaminating train records -> token-length filter -> kept
    changes       records each cleaning stage modified (html, fix_text, unicode, ...)
    duplicates    duplicate rate, and which earlier source each duplicate was found in
    lengths       characters and tokens per record (mean, percentiles, histograms)
    chat          turns per dialogue, share of messages and characters by role
    preference    chosen vs rejected length (the "longer answer wins" bias), prompt turns
    tokens        the most frequent tokens per source; bytes per token of the tokenizer
    mixture       mixing weights against each source's share of records and tokens
    throughput    MB/s of cleaning + dedup, of tokenization, and end to end

The accumulator is fed one kept record at a time (streaming: it holds a few numbers per
record and one token-count vector per source), so the report costs no second pass.
"""

import os

import numpy as np

from data_pipelines import records as records_lib
from t5x_like.core import files, plots
from t5x_like.core import markdown as markdown_lib

PERCENTILES = (50, 90, 99)


class Stats:
    """Per (source, split) counters and length samples; see the module docstring."""

    def __init__(self, kinds: dict[str, str], vocab_size: int, piece=None):
        self.kinds = kinds
        self.piece = piece  # id -> piece text, for the top-token tables
        self.vocab_size = vocab_size
        self.lengths: dict[tuple, dict[str, list]] = {}
        self.token_counts = {name: np.zeros(vocab_size, np.int64) for name in kinds}
        self.roles = {name: {} for name in kinds}
        # (name, split) -> [current doc, its tokens, its records, its where, documents,
        #                   largest doc's tokens, its records, its where]
        self.docs: dict[tuple, list] = {}

    def add(self, name: str, split: str, record: dict, ids: list[int], parts: dict[str, int],
            doc=None, where: str = ""):
        """doc: the input document the record comes from (consecutive records of one document,
        the pieces of a split one, count together in the largest-document figure)."""
        kind = self.kinds[name]
        d = self.docs.setdefault((name, split), [None, 0, 0, "", 0, 0, 0, ""])
        if doc is None or doc != d[0]:
            d[:5] = [doc, 0, 0, where, d[4] + 1]
        d[1] += len(ids)
        d[2] += 1
        if d[1] > d[5]:
            d[5:] = d[1], d[2], d[3]
        text = records_lib.text_view(record, kind)
        cols = self.lengths.setdefault((name, split), {})
        cols.setdefault("chars", []).append(len(text))
        cols.setdefault("tokens", []).append(len(ids))
        cols.setdefault("bytes", []).append(len(text.encode("utf-8")))
        if split == "train" and ids:
            self.token_counts[name] += np.bincount(ids, minlength=self.vocab_size)[:self.vocab_size]
        if kind in ("chat", "preference"):
            messages = record["messages"] if kind == "chat" else [
                *record["prompt"], {"role": "assistant", "content": record["chosen"]}]
            cols.setdefault("turns", []).append(sum(m["role"] == "user" for m in messages))
            for m in messages:
                messages_chars = self.roles[name].setdefault(m["role"], [0, 0])
                messages_chars[0] += 1
                messages_chars[1] += len(m["content"])
        if kind == "preference":
            cols.setdefault("chosen_chars", []).append(len(record["chosen"]))
            cols.setdefault("rejected_chars", []).append(len(record["rejected"]))
            cols.setdefault("chosen_tokens", []).append(parts["chosen"])
            cols.setdefault("rejected_tokens", []).append(parts["rejected"])

    def summary(self) -> dict:
        out: dict = {}
        for (name, split), cols in sorted(self.lengths.items()):
            entry = out.setdefault(name, {}).setdefault(split, {"records": len(cols["chars"])})
            for col, values in cols.items():
                v = np.asarray(values)
                entry[col] = {"total": int(v.sum()), "mean": round(float(v.mean()), 2),
                              **{f"p{p}": int(np.percentile(v, p)) for p in PERCENTILES},
                              "max": int(v.max())}
            d = self.docs.get((name, split))
            if d:  # the input document giving most tokens (several records when it was split)
                entry["documents"] = d[4]
                entry["largest_document"] = {
                    "tokens": d[5], "records": d[6], "where": d[7],
                    "share": round(d[5] / max(int(np.sum(cols["tokens"])), 1), 4)}
            if "chosen_chars" in cols:
                c, r = np.asarray(cols["chosen_tokens"]), np.asarray(cols["rejected_tokens"])
                entry["chosen_longer_share"] = round(float(np.mean(c > r)), 4)
                entry["length_skew_tokens"] = round(float(c.mean() / max(r.mean(), 1e-9)), 4)
        for name in self.kinds:
            entry = out.setdefault(name, {})
            counts = self.token_counts[name]
            total = int(counts.sum())
            train_bytes = int(np.sum(self.lengths.get((name, "train"), {}).get("bytes", [])))
            entry["train_tokens"] = total
            entry["train_bytes"] = train_bytes
            entry["bytes_per_token"] = round(train_bytes / total, 4) if total else 0.0
            top = np.argsort(-counts, kind="stable")[:20]
            entry["top_tokens"] = [{"id": int(i), "piece": self.piece(int(i)) if self.piece else "",
                                    "share": round(int(counts[i]) / total, 5)}
                                   for i in top if counts[i]]
            if self.roles[name]:
                n_msgs = sum(v[0] for v in self.roles[name].values())
                n_chars = sum(v[1] for v in self.roles[name].values())
                entry["roles"] = {
                    role: {"messages": v[0], "message_share": round(v[0] / n_msgs, 4),
                           "chars": v[1], "char_share": round(v[1] / max(n_chars, 1), 4)}
                    for role, v in sorted(self.roles[name].items())}
        return out


# ---------------------------------------------------------------------------------------------
# Writing the report.


def write(out_dir: str, report: dict, stats: Stats | None) -> None:
    """report.json, report.md and plots/*.png under out_dir."""
    written = _plots(out_dir, report, stats) if stats is not None else []
    report = dict(report, plots=written)
    files.atomic_write_json(os.path.join(out_dir, "report.json"), report, sort_keys=True)
    files.atomic_write_text(os.path.join(out_dir, "report.md"), markdown(report))


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.2f}" if isinstance(n, float) else str(n)


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(markdown_lib.table(header, [[_fmt(c) for c in row] for row in rows])) + "\n"


def markdown(report: dict) -> str:
    src, stats = report["sources"], report.get("stats", {})
    names = list(src)
    all_tokens = max(1, sum(stats.get(m, {}).get("train_tokens", 0) for m in names))
    md = [f"# Data preparation report\n\n{report.get('description', '')}\n"]
    if report.get("warnings"):
        md.append("## Warnings\n\n" + "".join(f"- **{w}**\n" for w in report["warnings"]))
    md.append("## Sources\n\nSources are processed in name order; on a duplicate, the earlier "
              "source's record is the one kept.\n")
    md.append(_table(
        ["source", "kind", "spec", "weight", "train", "validation", "train tokens",
         "share of tokens"],
        [[n, src[n]["kind"], f"`{src[n]['source']}`", src[n]["weight"],
          src[n]["splits"].get("train", 0), src[n]["splits"].get("validation", 0),
          stats.get(n, {}).get("train_tokens", 0),
          f"{stats.get(n, {}).get('train_tokens', 0) / all_tokens:.1%}"]
         for n in names]))

    stages = [s for s in report["stage_order"] if any(src[n]["funnel"].get(s) for n in names)]
    md.append("## What each stage removed\n\n`read` counts input records; each later column "
              "counts the records that stage dropped; `kept` is what was written (both splits; "
              "a document split for data.clean.max_doc_chars counts once per piece; "
              "`repeated_lines`: documents that held only lines repeated across the source).\n")
    md.append(_table(["source", "read", *stages, "kept"],
                     [[n, src[n]["funnel"].get("read", 0), *[src[n]["funnel"].get(s, 0)
                                                             for s in stages],
                       sum(src[n]["splits"].values())] for n in names]))
    changes = sorted({s for n in names for s in src[n].get("changed", {})})
    if changes:
        md.append("\nRecords each cleaning stage modified (kept or not):\n\n")
        md.append(_table(["source", *changes],
                         [[n, *[src[n].get("changed", {}).get(s, 0) for s in changes]]
                          for n in names]))
    bad = {n: src[n]["bad_examples"] for n in names if src[n].get("bad_examples")}
    if bad:
        md.append("\nSkipped bad records (first few):\n\n")
        md += [f"- {n}: {e}\n" for n, examples in bad.items() for e in examples]

    md.append("\n## Duplicates\n\nRate = exact + near duplicates (+ contaminating train records) "
              "over records that passed cleaning. `found in` names the source of the earlier "
              "copy.\n\n")
    rows = []
    for n in names:
        f = src[n]["funnel"]
        dups = f.get("exact", 0) + f.get("near", 0) + f.get("contaminated", 0)
        base = (dups + sum(src[n]["splits"].values()) + f.get("max_tokens", 0)
                + f.get("min_tokens", 0))
        found = ", ".join(f"{m}: {c}" for m, c in sorted(src[n].get("duplicate_of", {}).items()))
        rows.append([n, f.get("exact", 0), f.get("near", 0), f.get("contaminated", 0),
                     f"{dups / max(base, 1):.2%}", found or "-"])
    md.append(_table(["source", "exact", "near", "train~validation", "rate", "found in"], rows))
    md.append(f"\nNear duplicates: MinHash over word {report['options']['ngram']}-grams, "
              f"{report['options']['num_perm']} permutations, Jaccard >= "
              f"{report['options']['threshold']} ({report['lsh'][0]} LSH bands of "
              f"{report['lsh'][1]} rows). Validation is never contaminated: "
              f"{report['decontamination']}\n")

    md.append("\n## Lengths\n\n")
    rows = []
    for n in names:
        for split in ("train", "validation"):
            e = stats.get(n, {}).get(split)
            if e:
                rows.append([n, split, e["records"], e["chars"]["mean"], e["chars"]["p50"],
                             e["chars"]["p99"], e["tokens"]["mean"], e["tokens"]["p50"],
                             e["tokens"]["p99"], e["tokens"]["max"]])
    md.append(_table(["source", "split", "records", "chars mean", "p50", "p99", "tokens mean",
                      "p50", "p99", "max"], rows))

    chat = [n for n in names if src[n]["kind"] in ("chat", "preference")]
    if chat:
        md.append("\n## Dialogue balance\n\nTurns = user turns per conversation (train). Role "
                  "shares are of messages / of characters.\n\n")
        rows = []
        for n in chat:
            e = stats.get(n, {})
            turns = e.get("train", {}).get("turns", {})
            roles = e.get("roles", {})
            rows.append([n, turns.get("mean", 0), turns.get("max", 0),
                         *[f"{roles.get(r, {}).get('message_share', 0):.1%} / "
                           f"{roles.get(r, {}).get('char_share', 0):.1%}"
                           for r in ("system", "user", "assistant")]])
        md.append(_table(["source", "turns mean", "turns max", "system", "user", "assistant"],
                         rows))
    pref = [n for n in names if src[n]["kind"] == "preference"]
    if pref:
        md.append("\n## Preference pairs: length skew\n\nReward models and DPO readily learn "
                  "\"longer is better\"; a skew far from 1 is a bias to correct for.\n\n")
        rows = []
        for n in pref:
            e = stats.get(n, {}).get("train", {})
            rows.append([n, e["chosen_tokens"]["mean"], e["rejected_tokens"]["mean"],
                         e["length_skew_tokens"], f"{e['chosen_longer_share']:.1%}"])
        md.append(_table(["source", "chosen tokens mean", "rejected tokens mean",
                          "chosen / rejected", "chosen longer"], rows))

    md.append("\n## Top tokens (train)\n\n")
    for n in names:
        top = stats.get(n, {}).get("top_tokens", [])[:12]
        md.append(f"- **{n}** ({stats.get(n, {}).get('bytes_per_token', 0):.2f} bytes/token): "
                  + ", ".join(f"`{t['piece']!r}` {t['share']:.1%}" for t in top) + "\n")

    tok = report["tokenizer"]
    md.append(f"\n## Tokenizer\n\n{tok['type']}, {tok['vocab_size']:,} pieces "
              f"({tok['origin']}); byte fallback; character coverage "
              f"{tok['character_coverage']}; special tokens: "
              f"{', '.join(f'`{s}`' for s in tok['special_tokens'])}.\n")
    if tok.get("bytes_per_token_validation"):
        md.append("\nBytes per token on each source's validation split: " + ", ".join(
            f"{n} {v:.3f}" for n, v in tok["bytes_per_token_validation"].items()) + "\n")

    mix = report.get("mixture")
    if mix:
        md.append("\n## Mixture\n\nTraining draws records from the sources of one kind in "
                  "proportion to their weights (`data.sources.<name>.weight`, or `data.mixture` "
                  "at training time); pretraining uses the text sources. Expected shares within "
                  "each kind:\n\n")
        md.append(_table(["source", "kind", "weight", "share of records", "share of tokens",
                          "epochs per 1M records"],
                         [[n, m["kind"], m["weight"], f"{m['record_share']:.1%}",
                           f"{m['token_share']:.1%}", m["epochs_per_million"]]
                          for n, m in mix.items()]))

    t = report["throughput"]
    md.append(f"\n## Throughput\n\n{report['runner']} runner, {report['num_workers']} worker "
              f"processes, {t['input_mb']:.2f} MB of input text: cleaning + dedup "
              f"{t['clean_dedup_mb_per_s']:.2f} MB/s ({t['clean_dedup_s']:.1f} s), tokenizer "
              f"training {t['tokenizer_train_s']:.1f} s, tokenization "
              f"{t['tokenize_mb_per_s']:.2f} MB/s ({t['tokenize_s']:.1f} s), writing + stats "
              f"{t['write_s']:.1f} s; end to end {t['total_mb_per_s']:.2f} MB/s "
              f"({t['total_s']:.1f} s).\n")
    if report.get("plots"):
        md.append("\n## Plots\n\n" + "".join(f"![{p}]({p})\n\n" for p in report["plots"]))
    return _blank_lines("".join(md))


def _blank_lines(text: str) -> str:
    """One blank line before each heading and table, as Markdown renderers need."""
    out: list[str] = []
    for line in text.split("\n"):
        starts_block = line.startswith("#") or (line.startswith("|") and not (
            out and out[-1].startswith("|")))
        if starts_block and out and out[-1].strip():
            out.append("")
        if line.strip() or (out and out[-1].strip()):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _plots(out_dir: str, report: dict, stats: Stats) -> list[str]:
    plt = plots.pyplot()
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    src = report["sources"]
    names = list(src)
    written = []

    def save(fig, name):
        path = os.path.join("plots", name)
        fig.tight_layout()
        # Fixed metadata: the same data gives the same PNG bytes.
        plots.save(fig, os.path.join(out_dir, path), dpi=90, metadata={"Software": None})
        written.append(path)

    # Funnel: records left after each stage, per source.
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(names)))
    steps = ["read", *report["stage_order"]]
    for i, n in enumerate(names):
        f, left = src[n]["funnel"], src[n]["funnel"].get("read", 0)
        lefts = [left]
        for s in report["stage_order"]:
            left -= f.get(s, 0)
            lefts.append(left)
        ax.plot(range(len(steps)), lefts, marker="o", label=n)
    ax.set_xticks(range(len(steps)), steps, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("records left")
    ax.set_title("Records left after each stage")
    ax.legend(fontsize=8)
    save(fig, "funnel.png")

    for col, label in (("chars", "characters"), ("tokens", "tokens")):
        fig, ax = plt.subplots(figsize=(8, 4))
        values = {n: np.asarray(stats.lengths[(n, "train")][col]) for n in names
                  if (n, "train") in stats.lengths}
        top = max((v.max() for v in values.values()), default=1)
        bins = np.logspace(0, np.log10(max(top, 10)) + 0.05, 40)
        for n, v in values.items():
            ax.hist(np.maximum(v, 1), bins=bins, histtype="step", linewidth=1.5, label=n)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} per record (train)")
        ax.set_ylabel("records")
        ax.legend(fontsize=8)
        save(fig, f"lengths_{col}.png")

    chat = [n for n in names if src[n]["kind"] in ("chat", "preference")
            and (n, "train") in stats.lengths]
    if chat:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for n in chat:
            turns = np.asarray(stats.lengths[(n, "train")]["turns"])
            ax1.hist(turns, bins=np.arange(0.5, turns.max() + 1.5), histtype="step",
                     linewidth=1.5, label=n)
        ax1.set_xlabel("user turns per conversation")
        ax1.set_ylabel("conversations")
        ax1.legend(fontsize=8)
        bottom = np.zeros(len(chat))
        for role in ("system", "user", "assistant"):
            shares = np.array([stats.roles[n].get(role, [0, 0])[1] for n in chat], float)
            totals = np.array([sum(v[1] for v in stats.roles[n].values()) for n in chat], float)
            shares = shares / np.maximum(totals, 1)
            ax2.bar(chat, shares, bottom=bottom, label=role)
            bottom += shares
        ax2.set_ylabel("share of characters")
        ax2.legend(fontsize=8)
        save(fig, "dialogues.png")

    pref = [n for n in names if src[n]["kind"] == "preference" and (n, "train") in stats.lengths]
    for n in pref:
        cols = stats.lengths[(n, "train")]
        c, r = np.asarray(cols["chosen_tokens"]), np.asarray(cols["rejected_tokens"])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        bins = np.logspace(0, np.log10(max(c.max(), r.max(), 10)) + 0.05, 30)
        ax1.hist(np.maximum(c, 1), bins=bins, histtype="step", linewidth=1.5, label="chosen")
        ax1.hist(np.maximum(r, 1), bins=bins, histtype="step", linewidth=1.5, label="rejected")
        ax1.set_xscale("log")
        ax1.set_xlabel("reply tokens")
        ax1.legend()
        ax2.scatter(np.maximum(r, 1), np.maximum(c, 1), s=4, alpha=0.4)
        lim = [1, max(c.max(), r.max(), 2)]
        ax2.plot(lim, lim, color="gray", linewidth=1)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("rejected tokens")
        ax2.set_ylabel("chosen tokens")
        fig.suptitle(f"{n}: chosen vs rejected length")
        save(fig, f"preference_{n}.png")

    mix = report.get("mixture")
    if mix:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        x = np.arange(len(mix))
        ax.bar(x - 0.2, [m["record_share"] for m in mix.values()], 0.4, label="records")
        ax.bar(x + 0.2, [m["token_share"] for m in mix.values()], 0.4, label="tokens")
        ax.set_xticks(x, list(mix))
        ax.set_ylabel("share of the training mixture")
        ax.legend()
        save(fig, "mixture.png")
    return written
