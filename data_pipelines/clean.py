"""Cleaning stages and quality filters, applied to every piece of text of a record.

Stages (each switched by a `data.clean.*` key and counted in the report as records changed):

    html         strip HTML/XML markup (only from text that has tags): scripts and styles go,
                 block elements become line breaks, entities are decoded (selectolax/lexbor).
                 Text records only: chat replies about code legitimately contain HTML.
    fix_text     mojibake ("cafÃ©" -> "café"), terminal escapes, control characters, odd line
                 breaks and surrogates (ftfy); quotes, ligatures and widths are left alone
    unicode      Unicode normalization: "NFC" (default, lossless) or "NFKC" (also folds
                 compatibility forms: "ﬁ" -> "fi", full-width -> ASCII, "²" -> "2")
    boilerplate  short lines that are web furniture (cookie banners, "All rights reserved",
                 "Click here", share buttons, "lorem ipsum", ...) are dropped; text records only
    whitespace   unusual spaces -> " ", zero-width characters dropped, trailing spaces cut,
                 runs of blank lines -> one blank line (indentation is kept: code stays code)
    lowercase    for non-LM uses only (classifiers, retrieval); off by default
    stopwords    likewise: drops the language's stop words (stop-words package); off by default.
                 Both destroy what a language model must learn (casing, function words), so
                 never turn them on for pretraining or chat data.

Filters (each drops a record and is counted):

    min_chars / max_chars                        length of the record's text_view in characters
                                                 (0 = no limit)
    max_dup_line_fraction                        share of characters in lines that occur more
                                                 than once (Gopher-style)
    max_dup_ngram_fraction (dup_ngram words)     share of words inside word n-grams that occur
                                                 more than once (Gopher-style repetition)

Repetition is measured in each piece of text (a message, a reply) on its own, the worst piece
deciding: an answer that restates its question is not a loop, but a reply stuck repeating
itself is. The defaults (lines 0.5, 10-grams 0.3) catch such loops and leave ordinary prose
alone; Gopher's web-text thresholds (0.3 lines, 5-grams 0.15) drop ~7% of Alpaca's answers.

Across the documents of a text source (prepare.py counts, then removes; text records only):

    repeated lines   a line found in more than `repeated_line_fraction` of a source's documents
                     (and in at least REPEATED_LINE_MIN_DOCS of them) is site furniture
                     ("Home | About | Contact", a footer) and is removed from all of them,
                     as in RefinedWeb / Dolma-style line dedup. Lines compare as exact dedup
                     does (case, punctuation and spacing ignored); lines with no word
                     characters and one-line documents are never touched (a single line is the
                     content, not furniture around it). A document left empty is dropped and
                     counted. The default (0.3) leaves Tiny Shakespeare's speaker names alone
                     (at most 9.6% of its documents); set 1 (off) for code, where `end` or
                     `import numpy as np` legitimately repeat across files.
    max_doc_chars    a text record longer than this is split into pieces of about equal size,
                     at paragraph, else line, else sentence, else word boundaries (a hard cut
                     only inside a longer run without spaces), at most MAX_PIECES pieces; the
                     pieces of one document share its split. min_chars / max_chars and the
                     repetition filters judge the whole document first, so `max_chars` is the
                     way to drop over-long documents instead of splitting them.

Token-length filters need the tokenizer and run when the dataset is written (prepare.py).
Invalid UTF-8 is repaired (or reported) by the readers (sources.iter_lines).
"""

import functools
import re
import unicodedata
from collections import Counter

from data_pipelines import dedup
from data_pipelines import records as records_lib

STAGES = ("html", "fix_text", "unicode", "boilerplate", "whitespace", "lowercase", "stopwords")

_TAG = re.compile(r"<(?:[a-zA-Z][a-zA-Z0-9-]*(?:\s[^<>]*)?/?|/[a-zA-Z][a-zA-Z0-9-]*\s*|!--.*?--)>",
                  re.S)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")
_BLOCKS = ("p,div,br,li,ul,ol,h1,h2,h3,h4,h5,h6,tr,table,section,article,header,footer,"
           "blockquote,pre,dd,dt,hr,nav,aside,form,title")
_DROPPED_TAGS = ["script", "style", "noscript", "template", "iframe", "svg", "head"]


def looks_like_html(text: str) -> bool:
    """Two or more tags (one `<` in prose or code is not markup), or a tag and entities."""
    tags = len(_TAG.findall(text, 0, 1 << 16))
    return tags >= 2 or (tags == 1 and bool(_ENTITY.search(text)))


def strip_html(text: str) -> str:
    if not looks_like_html(text):
        return text
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(text)
    tree.strip_tags(_DROPPED_TAGS)
    for node in tree.css(_BLOCKS):
        node.insert_before("\n")
        node.insert_after("\n")
    root = tree.body if tree.body is not None else tree.root
    return root.text(deep=True) if root is not None else ""


_FTFY_NEEDED = re.compile(r"[^\x09\x0a\x20-\x7e]")  # anything but tab, newline, printable ASCII


@functools.cache
def _ftfy_config():
    import ftfy

    return ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False,
                                fix_latin_ligatures=False, fix_character_width=False,
                                normalization=None, explain=False)


def fix_text(text: str) -> str:
    # ftfy runs at ~2 MB/s; plain printable ASCII is already fine, so skip it there.
    if not _FTFY_NEEDED.search(text):
        return text
    import ftfy

    return ftfy.fix_text(text, _ftfy_config())


_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u000b\u000c]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _ODD_SPACES.sub(" ", text))
    return _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip("\n")


# Web furniture, matched case-insensitively against lines of at most 200 characters.
BOILERPLATE_PATTERNS = (
    r"\b(this|our) (web)?site uses cookies\b", r"\baccept (all )?cookies\b", r"\bcookie policy\b",
    r"\ball rights reserved\b", r"^\s*(copyright|©|\(c\))\s*(©\s*)?\d{4}",
    r"\bprivacy policy\b", r"\bterms (of use|of service|and conditions)\b",
    r"\bclick here\b", r"\bsubscribe to (our|the) newsletter\b", r"\bsign up for (our|the)\b",
    r"^\s*(share|tweet|pin it|like us) (on|this)\b", r"\bfollow us on\b",
    r"\benable javascript\b", r"\bjavascript (is|must be) (disabled|enabled)\b",
    r"\blorem ipsum\b", r"^\s*(skip to (main )?content|back to top|read more|log ?in|sign ?in)\s*$",
)
_BOILERPLATE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.I)


def remove_boilerplate(text: str) -> str:
    lines = text.split("\n")
    kept = [line for line in lines if len(line) > 200 or not _BOILERPLATE.search(line)]
    return "\n".join(kept) if len(kept) != len(lines) else text


@functools.cache
def _stop_words(language: str) -> frozenset[str]:
    from stop_words import get_stop_words

    return frozenset(get_stop_words(language))


def remove_stop_words(text: str, language: str) -> str:
    stop = _stop_words(language)
    def keep(word: str) -> bool:
        return word.lower().strip(".,;:!?\"'()") not in stop

    return "\n".join(" ".join(filter(keep, line.split(" "))) for line in text.split("\n"))


# Stages that only make sense for web-like text, not for dialogue turns.
TEXT_ONLY_STAGES = ("html", "boilerplate")


def stage_functions(opts: dict, kind: str = "text") -> list[tuple[str, callable]]:
    """The enabled stages for records of `kind`, in order, as (name, str -> str)."""
    out = []
    if opts["html"] and kind == "text":
        out.append(("html", strip_html))
    if opts["fix_text"]:
        out.append(("fix_text", fix_text))
    if opts["unicode"]:
        out.append(("unicode", functools.partial(unicodedata.normalize, opts["unicode"])))
    if opts["boilerplate"] and kind == "text":
        out.append(("boilerplate", remove_boilerplate))
    if opts["whitespace"]:  # after boilerplate: tidies the gaps its dropped lines leave
        out.append(("whitespace", normalize_whitespace))
    if opts["lowercase"]:
        out.append(("lowercase", str.lower))
    if opts["stopwords"]:
        out.append(("stopwords", functools.partial(remove_stop_words, language=opts["stopwords"])))
    return out


def dup_line_fraction(text: str) -> float:
    """Share of characters in non-blank lines that occur more than once in the text."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    counts = Counter(lines)
    total = sum(len(line) for line in lines)
    return sum(len(line) for line in lines if counts[line] > 1) / total


def dup_ngram_fraction(text: str, n: int) -> float:
    """Share of words covered by word n-grams that occur more than once (0 below 2n words)."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(covered) / len(words)


def filter_reason(text: str, opts: dict, pieces: list[str] | None = None) -> str:
    """The name of the first filter that rejects a record, or "" to keep it.

    text: the record's text_view (length filters); pieces: its texts (repetition filters).
    """
    n = len(text)
    if opts["min_chars"] and n < opts["min_chars"]:
        return "min_chars"
    if opts["max_chars"] and n > opts["max_chars"]:
        return "max_chars"
    pieces = [text] if pieces is None else pieces
    limit = opts["max_dup_line_fraction"]
    if limit < 1 and any(dup_line_fraction(p) > limit for p in pieces):
        return "dup_lines"
    limit = opts["max_dup_ngram_fraction"]
    if limit < 1 and any(dup_ngram_fraction(p, opts["dup_ngram"]) > limit for p in pieces):
        return "dup_ngrams"
    return ""


def clean_record(record: dict, kind: str, opts: dict,
                 stages: list | None = None) -> tuple[dict | None, list[str], str]:
    """-> (cleaned record or None, names of the stages that changed it, reason it was dropped).

    Preference pairs whose chosen and rejected replies become identical are dropped too: they
    teach nothing.
    """
    record, changed = transform(record, kind, opts, stages)
    reason = judge(record, kind, opts)
    return (None if reason else record), changed, reason


def transform(record: dict, kind: str, opts: dict, stages: list | None = None
              ) -> tuple[dict, list[str]]:
    """-> (the record through the cleaning stages, names of the stages that changed it)."""
    changed = []
    for name, fn in stages if stages is not None else stage_functions(opts, kind):
        new = records_lib.map_contents(record, kind, fn)
        if new != record:
            changed.append(name)
            record = new
    return record, changed


def judge(record: dict, kind: str, opts: dict) -> str:
    """The reason a cleaned record is dropped (empty, identical pair, a filter), or ""."""
    if records_lib.has_empty_part(record, kind):
        return "empty"
    if kind == "preference" and record["chosen"] == record["rejected"]:
        return "chosen_is_rejected"
    return filter_reason(records_lib.text_view(record, kind), opts,
                         records_lib.pieces(record, kind))


# ---------------------------------------------------------------------------------------------
# Across documents: repeated lines, and splitting over-long documents.

REPEATED_LINE_MIN_DOCS = 10  # a line in fewer documents is never furniture, whatever the share
MAX_PIECES = 256  # pieces per document: the part byte of its order key (readers.make_key)


def _line_key(line: str) -> int | None:
    import xxhash

    normalized = dedup.normalize(line) if line.strip() else ""
    return xxhash.xxh64_intdigest(normalized.encode("utf-8")) if normalized else None


def _multi_line(lines: list[str]) -> bool:
    return sum(1 for line in lines if line.strip()) >= 2


def line_keys(text: str) -> list[int]:
    """Hashes of the distinct countable lines of a document (none for a one-line document)."""
    lines = text.split("\n")
    if not _multi_line(lines):
        return []
    return sorted({k for k in map(_line_key, lines) if k is not None})


def repeated_lines(counts: dict, docs: int, fraction: float) -> set[int]:
    """The line hashes found in more than `fraction` of `docs` documents (and in at least
    REPEATED_LINE_MIN_DOCS)."""
    if fraction >= 1:
        return set()
    floor = max(REPEATED_LINE_MIN_DOCS - 1, fraction * docs)
    return {k for k, n in counts.items() if n > floor}


def remove_lines(text: str, keys: set[int]) -> tuple[str, list[tuple[int, str]]]:
    """-> (text without the lines whose hash is in `keys`, [(hash, line) removed])."""
    lines = text.split("\n")
    if not keys or not _multi_line(lines):
        return text, []
    kept, removed = [], []
    for line in lines:
        key = _line_key(line)
        if key is not None and key in keys:
            removed.append((key, line.strip()))
        else:
            kept.append(line)
    return ("\n".join(kept).strip("\n") if removed else text), removed


# Cut points, strongest first: a blank line, a line break, a sentence end, any space.
_CUTS = (re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*"), re.compile(r"\n"), re.compile(r"(?<=[.!?;])\s+"),
         re.compile(r"\s+"))


def split_long(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars characters (see the module docstring); [text] if short."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    limit = max(max_chars, -(-len(text) // MAX_PIECES))
    pieces, start = [], 0
    while len(text) - start > limit:
        left = -(-(len(text) - start) // limit)  # pieces still to make
        target = start + (len(text) - start) // left  # about equal pieces
        lo, hi = start + (target - start) // 2, min(start + limit, target + (target - start) // 2)
        cut = None
        for pattern in _CUTS:
            found = [m for m in pattern.finditer(text, lo, hi + 1) if m.start() > start]
            if found:
                cut = min(found, key=lambda m: abs(m.start() - target))
                break
        end, start_next = (cut.start(), cut.end()) if cut else (target, target)
        pieces.append(text[start:end])
        start = start_next
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]
