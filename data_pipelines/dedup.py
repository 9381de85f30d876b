"""Deduplication: exact (normalized hash) and near-duplicate (MinHash + LSH, datasketch).

Both compare `records.text_view` of every record, across all sources of a preparation:

    normalize(text)   NFKC, case-folded, punctuation and whitespace runs -> one space; so
                      "Hello,  World!" and "hello world" are exact duplicates
    exact_key         8-byte BLAKE2b of the normalized text; also decides the split, so exact
                      duplicates can never land on both sides of train/validation
    signature         MinHash (datasketch, `num_perm` permutations, `seed`; shingles hashed
                      with xxh32) of the set of word `ngram`-shingles of the normalized text

The rules, in the order of records (sources by name, then file and position), are the same
for the local path (this module) and the Beam path (beam_prepare.py), so both keep exactly
the same records:

    exact   a record is dropped when an earlier record has the same exact_key
    near    a record is dropped when an earlier record (one that survived exact dedup) shares
            an LSH band with it and their estimated Jaccard similarity is >= threshold; the
            LSH bands (b bands of r rows) are datasketch's optimum for the threshold,
            weighted towards recall (LSH_WEIGHTS)
    decontaminate  a train record is dropped when a validation record is a near duplicate of
            it, whatever their order (exact duplicates share a split by construction). Near
            dedup across everything already implies this, so it is a separate pass only when
            near dedup is off.

Memory: the local path keeps every signature (4 bytes x num_perm per record) and datasketch's
in-memory LSH index; for corpora beyond one machine use the Beam path (`data.runner=beam`),
where bands are keys of a GroupByKey.
"""

import functools
import hashlib
import re
import unicodedata

import numpy as np

_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str, normalized: str | None = None) -> bytes:
    normalized = normalize(text) if normalized is None else normalized
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest()


def in_validation(key: bytes, fraction: float) -> bool:
    """The split of a record from its exact key: stable as records are added or reordered."""
    return int.from_bytes(key, "little") / 2.0 ** 64 < fraction


def shingles(normalized: str, n: int) -> list[bytes]:
    """The distinct word n-grams of a normalized text (one shingle if shorter than n)."""
    words = normalized.split()
    if not words:
        return []
    if len(words) <= n:
        return [normalized.encode("utf-8")]
    return list({" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


@functools.cache
def _template(num_perm: int, seed: int):
    import datasketch
    import xxhash

    # xxh32: the shingle hash (datasketch's default SHA-1 is ~5x slower, same statistics).
    return datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)


def signatures(normalized: list[str], *, num_perm: int, seed: int, ngram: int) -> list:
    """MinHash signatures (datasketch LeanMinHash, uint32[num_perm]) of normalized texts."""
    import datasketch

    template = _template(num_perm, seed)
    hashes = datasketch.MinHash.bulk([shingles(t, ngram) for t in normalized],
                                     num_perm=num_perm, seed=seed,
                                     hashfunc=template.hashfunc,
                                     permutations=template.permutations, scheme=template.scheme)
    return [datasketch.LeanMinHash(m) for m in hashes]


def lean(hashvalues: np.ndarray, seed: int):
    """A signature back from its hash values (as stored in the spool or sent through Beam)."""
    import datasketch

    return datasketch.LeanMinHash(seed=seed, hashvalues=hashvalues, scheme="affine32")


def similarity(a, b) -> float:
    """Estimated Jaccard similarity of two signatures (LeanMinHash or hash-value arrays)."""
    a = getattr(a, "hashvalues", a)
    b = getattr(b, "hashvalues", b)
    return float(np.mean(a == b))


# datasketch picks (bands, rows) minimizing a weighted sum of false positive and false negative
# probability. Every candidate is then checked against its signature, so a false positive costs
# only a comparison: weigh misses heavily. At threshold 0.8 with 128 permutations this gives 16
# bands of 8 rows, missing 5% of pairs at similarity 0.8 and 0.6% at 0.85 (equal weights: 9 x 13,
# missing 60% and 31%).
LSH_WEIGHTS = (0.05, 0.95)


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for this threshold."""
    import datasketch

    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def band_keys(hashvalues: np.ndarray, threshold: float) -> list[bytes]:
    """One key per LSH band: records sharing any key are near-duplicate candidates (the same
    bands as datasketch's MinHashLSH index, which the local path uses)."""
    b, r = lsh_params(threshold, len(hashvalues))
    values = np.asarray(hashvalues, np.uint32)
    return [bytes([i]) + values[i * r:(i + 1) * r].tobytes() for i in range(b)]


class Deduper:
    """The local path's dedup state: records are offered one by one, in order.

    `offer` answers "" (keep), "exact" or "near", and which earlier source it duplicates. With
    near dedup off but decontamination on, validation records are remembered and train records
    are checked against them at the end (`contaminated`).
    """

    def __init__(self, *, exact: bool, near: bool, decontaminate: bool, threshold: float,
                 num_perm: int, seed: int):
        import datasketch

        self.exact, self.near = exact, near
        self.decontaminate = decontaminate and not near  # near dedup implies it
        self.threshold = threshold
        self.seed = seed
        self._exact_seen: dict[bytes, int] = {}
        self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm,
                                          weights=LSH_WEIGHTS)
        self._sigs: dict = {}  # key -> (hash values, source index)
        self._val_lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm,
                                              weights=LSH_WEIGHTS)

    def offer(self, key, source: int, ekey: bytes, sig, validation: bool) -> tuple[str, int]:
        """sig: the record's LeanMinHash (None when it has no words)."""
        if self.exact:
            first = self._exact_seen.get(ekey)
            if first is not None:
                return "exact", first
            self._exact_seen[ekey] = source
        if sig is None:
            return "", -1
        if self.near:
            verdict = ("", -1)
            for other in sorted(self._lsh.query(sig)):  # the earliest match is reported
                other_sig, other_source = self._sigs[other]
                if similarity(sig, other_sig) >= self.threshold:
                    verdict = ("near", other_source)
                    break
            # Every exact survivor joins the index, dropped or not: "an earlier record" in the
            # rule above, which is what the Beam path can compute inside one band group.
            self._lsh.insert(key, sig, check_duplication=False)
            self._sigs[key] = (sig.hashvalues, source)
            return verdict
        if self.decontaminate and validation:
            self._val_lsh.insert(key, sig, check_duplication=False)
            self._sigs[key] = (sig.hashvalues, source)
        return "", -1

    def contaminated(self, sig) -> int:
        """The source of a validation record this train record nearly duplicates, or -1.

        (Exact duplicates share their split by construction, so only near ones can leak.)
        """
        if sig is not None:
            for other in sorted(self._val_lsh.query(sig)):
                other_sig, other_source = self._sigs[other]
                if similarity(sig, other_sig) >= self.threshold:
                    return other_source
        return -1
