"""MinHash over character shingles and LSH band keys (pure numpy, deterministic from a seed).

Character n-grams (whitespace removed) because Korean attaches particles to words: changing one particle
("데이터를" -> "데이터가") breaks every whitespace-word n-gram that contains the word, but only the few
character n-grams that span the particle.
"""

from __future__ import annotations

import re

import numpy as np

_MAX32 = np.uint64(0xFFFFFFFF)
_WS = re.compile(r"\s+")


class MinHasher:
    def __init__(self, ngram: int, num_perm: int, bands: int, seed: int):
        if num_perm % bands:
            raise ValueError(f"bands {bands} must divide num_perm {num_perm}")
        self.ngram, self.num_perm, self.bands = ngram, num_perm, bands
        self.rows = num_perm // bands
        rng = np.random.Generator(np.random.PCG64(seed))
        # Multiply-shift hashing of 32-bit shingles: h(x) = ((a*x + b) mod 2^64) >> 32 with odd a; as good a
        # permutation family for MinHash as (a*x + b) mod p, without the (slow) 64-bit modulo.
        self.a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
        self.powers = np.array(
            [pow(1_000_003, ngram - 1 - k, 1 << 64) for k in range(ngram)], dtype=np.uint64
        )

    def shingles(self, text: str) -> np.ndarray:
        """Unique 32-bit hashes of the character n-grams of `text` (whitespace removed)."""
        s = _WS.sub("", text)
        if not s:
            return np.zeros(0, dtype=np.uint64)
        cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = self.ngram
        if len(cps) < n:
            cps = np.concatenate([cps, np.zeros(n - len(cps), dtype=np.uint64)])
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around uint64 arithmetic is the hash
            for k in range(n):
                h += cps[k : k + m] * self.powers[k]
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
        return np.unique(h & _MAX32)

    def signature(self, text: str, chunk: int = 4096) -> np.ndarray:
        sh = self.shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(sh), chunk):
            part = sh[i : i + chunk, None]
            with np.errstate(over="ignore"):
                vals = (part * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
            np.minimum(sig, vals.min(axis=0), out=sig)
        return (sig & _MAX32).astype(np.uint32)

    def band_hashes(self, sigs_NP: np.ndarray) -> np.ndarray:
        """(N, bands) uint64 bucket keys: a 64-bit hash of each band's `rows` signature values. Two documents
        share a bucket when a band's rows are equal (a hash collision only makes a candidate, which the
        full-signature Jaccard check then rejects)."""
        sigs = np.asarray(sigs_NP, dtype=np.uint64).reshape(len(sigs_NP), self.bands, self.rows)
        h = np.full(sigs.shape[:2], 0x9E3779B97F4A7C15, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around uint64 arithmetic is the hash
            for r in range(self.rows):
                h = (h ^ sigs[:, :, r]) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(31)
        return h


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))
