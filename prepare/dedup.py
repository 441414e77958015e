"""Exact and near-duplicate detection for prepare/text.py. Only hashes and signatures are kept, never
the documents: per kept document about 150 bytes for exact dedup and 1.5 KB for near dedup (measured
with tracemalloc at the defaults), so a million documents need about 1.6 GB.

Exact: two documents are the same if they match after lowercasing and collapsing whitespace;
exact_key() is an 8-byte hash of that normal form.

Near: MinHash (Broder 1997) estimates the Jaccard similarity |A & B| / |A | B| of two documents'
shingle sets (word n-grams, or character n-grams); locality-sensitive hashing (LSH, as in
Leskovec, Rajaraman and Ullman, "Mining of Massive Datasets", ch. 3) cuts each signature into
`bands` bands of `rows` values and only compares documents that agree on a whole band. A candidate
counts as a duplicate when its estimated similarity reaches the threshold.
"""

import hashlib
import zlib

import numpy as np


def normalize(text):
    """The form exact dedup compares: lowercase, whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def exact_key(text):
    """A 64-bit hash of normalize(text); two different texts share it with probability ~2^-64 per pair."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest(), "little")


_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: an odd multiplier that spreads bits (Knuth)


def word_shingles(words, size=5):
    """One 32-bit hash per run of `size` consecutive words (clean.WORD's words: each CJK character is
    one), case ignored. A text shorter than one shingle is one shingle."""
    # crc32 gives the same number in every process, unlike Python's salted hash()
    return _windows(np.array([zlib.crc32(w.lower().encode("utf-8")) for w in words], dtype=np.uint64), size)


def char_shingles(text, size=5):
    """One 32-bit hash per run of `size` characters of the normalised text."""
    return _windows(np.frombuffer(normalize(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64), size)


def _windows(units, size):
    """A polynomial hash of each window of `size` units (wrapping mod 2^64), keeping its high 32 bits."""
    if units.size == 0:
        return units.astype(np.uint32)
    n = min(size, units.size)
    h = np.zeros(units.size - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * _MIX + units[k:units.size - n + 1 + k]
    return (h >> np.uint64(32)).astype(np.uint32)  # the high bits are the well-mixed ones


def minhash_params(num_perm, seed=0):
    """num_perm random hash functions h(x) = (a*x + b) >> 32 over 64 bits (multiply-shift,
    Dietzfelbinger et al. 1997). Fixed seed: signatures from different runs compare."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]  # (num_perm, 1), to broadcast over shingles


def minhash(hashes, params, chunk=4096):
    """The signature: for each hash function, the smallest value over the shingles; (num_perm,) uint32.
    Two signatures agree at one position with probability equal to the sets' Jaccard similarity."""
    a, b = params
    sig = np.full(a.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((a.shape[0], min(chunk, hashes.size)), dtype=np.uint64)  # at most 4 MB at 128 functions
    for i in range(0, hashes.size, chunk):
        x = hashes[i:i + chunk].astype(np.uint64)  # (n,)
        h = buf[:, :x.size]  # (num_perm, n)
        np.multiply(a, x, out=h)  # a*x + b, wrapping mod 2^64; in place, this is the hot loop
        h += b
        np.minimum(sig, h.min(axis=1), out=sig)
    return (sig >> np.uint64(32)).astype(np.uint32)  # the shift keeps order, so it can come after the min


def lsh_bands(threshold, num_perm):
    """(bands, rows) with bands * rows <= num_perm. Two documents of similarity s share at least one
    band with probability p(s) = 1 - (1 - s^rows)^bands, an S-curve; pick the curve with the least area of
    errors: p(s) below the threshold (false candidates) plus 1 - p(s) above it (missed duplicates).
    Candidates are verified against the full signatures, so a false one costs only a comparison, while a
    miss lets a duplicate through: misses weigh 4x (for 0.8 and 128: 12 bands of 10 rows, p(0.85) = 0.93)."""
    s = np.linspace(0, 1, 1001)
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1 - (1 - s**rows) ** bands
        error = np.where(s < threshold, p, 4 * (1 - p)).mean()
        if best is None or error < best[0]:
            best = (error, bands, rows)
    return best[1], best[2]


class NearDuplicates:
    """The signatures of the documents kept so far, indexed by LSH band."""

    def __init__(self, threshold, num_perm):
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)  # grows by doubling
        self.count = 0
        # per band: hash of the band's values -> the first kept document with them. One number, not a list:
        # a later document in the same bucket is no near duplicate of it (else it was dropped), and is still
        # found through its other bands; lists would double the memory (measured 2.7 KB per document).
        self.buckets = [{} for _ in range(self.bands)]

    def _keys(self, sig):
        # Python's hash() of bytes is salted per process, which is fine: the tables live in one process
        # and only propose candidates, which are then checked against the full signatures.
        return [hash(sig[j * self.rows:(j + 1) * self.rows].tobytes()) for j in range(self.bands)]

    def is_duplicate(self, sig):
        """True if sig is near an earlier kept document's; else remember it and return False."""
        keys = self._keys(sig)
        candidates = {bucket[key] for bucket, key in zip(self.buckets, keys) if key in bucket}
        if candidates:
            similarity = (self.signatures[sorted(candidates)] == sig).mean(axis=1)  # estimated Jaccard
            if similarity.max() >= self.threshold:
                return True
        if self.count == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[self.count] = sig
        for bucket, key in zip(self.buckets, keys):
            bucket.setdefault(key, self.count)
        self.count += 1
        return False
