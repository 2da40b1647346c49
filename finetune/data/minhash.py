"""Exact + near-duplicate index for dedup_filter: datasketch's MinHash, vectorised over many documents.

Given the same shingle values, signatures are bit-identical to datasketch's `MinHash(num_perm,
seed=1)` (its default affine32 scheme: MurmurHash3 fmix pre-mix, `a*h + b mod 2^32`), and the
bands are the ones `datasketch.MinHashLSH` picks (see `bands`). What differs is the
bookkeeping: documents are hashed a chunk at a time in numpy, and the index of kept rows is a few
sorted numpy arrays (log-structured runs) instead of one Python object per row and band. In
memory per kept row: its signature (4 bytes x num_perm), one 12-byte entry per band and one for
the exact hash, and one byte for its split: ~0.7 KB at num_perm=128, no per-row Python objects.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

SHINGLES_PER_BLOCK = 1 << 16  # bounds the (num_perm x shingles) matrix: 32 MiB at num_perm=128
CROWD = 8  # within a chunk, a document is paired with at most this many earlier members of a bucket
SEPARATOR = "\x00\x01"  # joins a chunk's texts for one split(); normalised text never contains it


@functools.lru_cache(maxsize=None)
def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) as datasketch.MinHashLSH(threshold, num_perm, weights=(0.1, 0.9)) picks them.
    Every candidate is confirmed by its estimated Jaccard, so a false candidate costs only a
    comparison while a missed one is a duplicate kept: weigh misses 9x (at threshold 0.8 and 128
    permutations: 14 bands of 9, a pair at Jaccard 0.85 becomes a candidate with p=0.975, vs 0.69
    with equal weights)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.1, 0.9)


@functools.lru_cache(maxsize=None)
def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=1).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(values: np.ndarray) -> np.ndarray:
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


class Hasher:
    """MinHash signatures of many documents at once.

    A shingle is `shingle_size` consecutive words of the normalised text (a shorter text is one
    shingle). Each distinct word is hashed once (blake2b, cached) and a shingle's 32-bit value
    is a fixed odd-weighted sum of its word hashes, so shingling is numpy work rather than one
    SHA-1 per shingle. From those values on, the signature is datasketch's:
    `MinHash(num_perm, seed=1, hashfunc=identity).update_batch(values).hashvalues`.
    """

    def __init__(self, num_perm: int, shingle_size: int, max_cached_words: int = 1 << 20):
        self.num_perm, self.shingle_size, self.max_cached_words = num_perm, shingle_size, max_cached_words
        self.a, self.b = permutations(num_perm)
        self.weights = (np.random.default_rng(shingle_size).integers(0, 2**31, shingle_size, dtype=np.uint64)
                        * 2 + 1).astype(np.uint32)
        self.words: dict[str, int] = {}
        self.separator = self._word_hashes([SEPARATOR])[0]
        self.buffer = np.empty((num_perm, SHINGLES_PER_BLOCK), dtype=np.uint32)  # reused: no page faults per block

    def _word_hashes(self, words: list[str]) -> list[int]:
        try:
            return list(map(self.words.__getitem__, words))
        except KeyError:
            if len(self.words) > self.max_cached_words:
                self.words.clear()
            for word in words:
                if word not in self.words:
                    self.words[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
            return list(map(self.words.__getitem__, words))

    def _words(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash of every word of every text, words per text); an empty text counts as one empty word."""
        texts = [text if text.strip() else "\x00" for text in texts]
        joined = f" {SEPARATOR} ".join(texts).split()  # one split for the chunk, not one per text
        hashes = np.array(self._word_hashes(joined), dtype=np.int64)
        boundaries = np.flatnonzero(hashes == self.separator)
        if len(boundaries) != len(texts) - 1:  # a text holds the separator word itself: split one by one
            lists = [self._word_hashes(text.split()) for text in texts]
            return np.array([h for hashes in lists for h in hashes], dtype=np.int64), np.array([len(h) for h in lists])
        lengths = np.diff(np.concatenate([[-1], boundaries, [len(hashes)]])) - 1
        return np.delete(hashes, boundaries), lengths

    def shingle_values(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(values, shingles per text): the 32-bit values of every text's shingles, concatenated."""
        words, lengths = self._words(texts)
        words = words.astype(np.uint32)
        starts = np.cumsum(lengths) - lengths
        ends = np.repeat(starts + lengths, lengths)
        index = np.arange(len(words))
        padded = np.concatenate([words, np.zeros(self.shingle_size, np.uint32)])
        with np.errstate(over="ignore"):
            values = words * self.weights[0]
            for offset in range(1, self.shingle_size):  # words past the text's end do not count
                values += np.where(index + offset < ends, padded[offset:offset + len(words)] * self.weights[offset], 0
                                   ).astype(np.uint32)
        counts = np.maximum(lengths - self.shingle_size + 1, 1)
        is_start = (index - np.repeat(starts, lengths)) < np.repeat(counts, lengths)
        return values[is_start], counts

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        values, counts = self.shingle_values(texts)
        hashed = _fmix32(values)  # datasketch's pre-mix
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        ends = np.cumsum(counts)
        first = 0
        while first < len(texts):  # blocks of whole texts, at most SHINGLES_PER_BLOCK shingles (or one text)
            begin = ends[first] - counts[first]
            last = max(first + 1, int(np.searchsorted(ends, begin + SHINGLES_PER_BLOCK, "right")))
            stop = ends[last - 1]
            block = hashed[begin:stop]
            buffer = self.buffer[:, : len(block)] if len(block) <= self.buffer.shape[1] else None
            with np.errstate(over="ignore"):  # a*h + b wraps mod 2^32, as datasketch intends
                permuted = np.multiply(self.a[:, None], block[None, :], out=buffer)
                permuted += self.b[:, None]
            offsets = (ends[first:last] - counts[first:last]) - begin
            out[first:last] = np.minimum.reduceat(permuted, offsets, axis=1).T
            first = last
        return out


def exact_keys(texts: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
                     for text in texts], dtype=np.int64)


class SortedRuns:
    """Append-only multimap int64 key -> int32 row, held as sorted numpy runs merged like a binary
    counter: O(log n) runs to search, amortised O(n log n) work, no Python object per entry."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], rows[order].astype(np.int32)))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            (keys_b, rows_b), (keys_a, rows_a) = self.runs.pop(), self.runs.pop()
            keys, rows = np.concatenate([keys_a, keys_b]), np.concatenate([rows_a, rows_b])
            order = np.argsort(keys, kind="stable")
            self.runs.append((keys[order], rows[order]))

    def find(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query position, row) whose key equals the query."""
        order = np.argsort(queries, kind="stable")
        ordered = queries[order]  # sorted queries walk each run in order: far fewer cache misses
        found_queries, found_rows = [np.empty(0, np.int64)], [np.empty(0, np.int32)]
        for keys, rows in self.runs:
            left = np.searchsorted(keys, ordered, "left")
            hit = np.flatnonzero(keys[np.minimum(left, len(keys) - 1)] == ordered)
            if not len(hit):
                continue
            first = left[hit]
            counts = np.searchsorted(keys, ordered[hit], "right") - first
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            found_queries.append(order[np.repeat(hit, counts)])
            found_rows.append(rows[np.repeat(first, counts) + within])
        return np.concatenate(found_queries), np.concatenate(found_rows)


class DedupIndex:
    """Kept rows of every split seen so far; `check` decides a chunk of documents in order."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int, exact: bool = True, near: bool = True):
        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        self.exact, self.near = exact, near
        self.num_bands, self.band_rows = bands(threshold, num_perm) if near else (0, 0)
        multipliers = np.random.default_rng(0).integers(1, 2**63, (self.num_bands, self.band_rows), dtype=np.uint64)
        self.multipliers = multipliers | np.uint64(1)
        self.hasher = Hasher(num_perm, shingle_size) if near else None
        self.exact_index, self.band_index = SortedRuns(), SortedRuns()
        self.signatures = np.empty((0, num_perm), dtype=np.uint32)
        self.groups = np.empty(0, dtype=np.uint8)
        self.group_names: list[str] = []
        self.size = 0

    def nbytes(self) -> int:
        """Memory held by the index (arrays as allocated, including growth headroom)."""
        runs = [array for index in (self.exact_index, self.band_index) for run in index.runs for array in run]
        return self.signatures.nbytes + self.groups.nbytes + sum(array.nbytes for array in runs)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) int64 keys: a rows-per-band slice of the signature, hashed per band."""
        sliced = sigs[:, : self.num_bands * self.band_rows].reshape(len(sigs), self.num_bands, self.band_rows)
        with np.errstate(over="ignore"):
            return (sliced.astype(np.uint64) * self.multipliers[None]).sum(axis=2).view(np.int64)

    def _store(self, sigs: np.ndarray | None, count: int, group: int) -> None:
        needed = self.size + count
        if needed > len(self.groups):  # grow by doubling: amortised O(1) per row
            capacity = max(needed, 2 * len(self.groups), 1024)
            self.groups = np.resize(self.groups, capacity)
            if sigs is not None:
                grown = np.empty((capacity, self.num_perm), dtype=np.uint32)
                grown[: self.size] = self.signatures[: self.size]
                self.signatures = grown
        if sigs is not None:
            self.signatures[self.size:needed] = sigs
        self.groups[self.size:needed] = group
        self.size = needed

    def check(self, texts: list[str], group: str) -> list[tuple[str, str] | None]:
        """For each normalised text, in order: None when it is new (it joins the index), else
        ("exact" | "near", split of the kept row it duplicates)."""
        if group not in self.group_names:
            self.group_names.append(group)
        code = self.group_names.index(group)
        decisions: list[tuple[str, str] | None] = [None] * len(texts)
        if not texts or not (self.exact or self.near):
            return decisions
        keys = exact_keys(texts)
        sigs = self.hasher.signatures(texts) if self.near else None
        band_keys = self.band_keys(sigs) if self.near else None
        earliest = np.full(len(texts), np.iinfo(np.int64).max)
        if self.exact:  # against rows kept in earlier chunks
            positions, rows = self.exact_index.find(keys)
            np.minimum.at(earliest, positions, rows)
            for position in np.flatnonzero(earliest < np.iinfo(np.int64).max):
                decisions[position] = ("exact", self.group_names[self.groups[earliest[position]]])
        if self.near:
            positions, rows = self.band_index.find(band_keys.reshape(-1))
            positions //= self.num_bands
            pending = np.array([decisions[p] is None for p in positions], dtype=bool)
            positions, rows = positions[pending], rows[pending]
            similar = (sigs[positions] == self.signatures[rows]).mean(axis=1) >= self.threshold
            near_earliest = np.full(len(texts), np.iinfo(np.int64).max)
            np.minimum.at(near_earliest, positions[similar], rows[similar])
            for position in np.flatnonzero(near_earliest < np.iinfo(np.int64).max):
                decisions[position] = ("near", self.group_names[self.groups[near_earliest[position]]])
        kept = self._within_chunk(keys, sigs, band_keys, decisions, group)
        if kept:
            kept_rows = np.arange(self.size, self.size + len(kept), dtype=np.int32)
            if self.exact:
                self.exact_index.add(keys[kept], kept_rows)
            if self.near:
                self.band_index.add(band_keys[kept].reshape(-1), np.repeat(kept_rows, self.num_bands))
            self._store(sigs[kept] if self.near else None, len(kept), code)
        return decisions

    def _near_pairs(self, sigs, band_keys, pending: np.ndarray):
        """Near-duplicate pairs among this chunk's pending documents, as {later: [earlier, ...]}, and
        {document: [(band, key), ...]} for documents in crowded buckets. Candidates share a band
        key (found by sorting each band's keys) and are confirmed by estimated Jaccard. Pairs are
        formed with the CROWD nearest members of a bucket only, so a bucket of thousands of similar
        rows (boilerplate) costs no quadratic blow-up; its members are checked one by one against its
        kept members instead."""
        earlier, later, crowded = [np.empty(0, np.int64)], [np.empty(0, np.int64)], {}
        for band in range(self.num_bands):
            keys = band_keys[pending, band]
            order = np.argsort(keys, kind="stable")  # stable: equal keys stay in document order
            sorted_keys = keys[order]
            for distance in range(1, min(CROWD, len(order) - 1) + 1):
                same = sorted_keys[distance:] == sorted_keys[:-distance]
                if not same.any():
                    break
                earlier.append(pending[order[:-distance][same]])
                later.append(pending[order[distance:][same]])
            else:
                _, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
                for position in np.flatnonzero(sizes[inverse] > CROWD + 1).tolist():
                    crowded.setdefault(int(pending[position]), []).append((band, int(keys[position])))
        pairs = np.unique(np.stack([np.concatenate(later), np.concatenate(earlier)], axis=1), axis=0)
        similar = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1) >= self.threshold
        partners: dict[int, list[int]] = {}
        for second, first in pairs[similar].tolist():
            partners.setdefault(second, []).append(first)
        return partners, crowded

    def _within_chunk(self, keys, sigs, band_keys, decisions, group) -> list[int]:
        """Documents not matched by earlier chunks, against the kept earlier documents of this chunk."""
        pending = np.array([position for position, decision in enumerate(decisions) if decision is None], dtype=np.int64)
        partners, crowded = self._near_pairs(sigs, band_keys, pending) if self.near and len(pending) > 1 else ({}, {})
        buckets: dict[tuple[int, int], list[int]] = {}  # crowded buckets: their kept members
        seen_exact: set[int] = set()
        kept_flags = [False] * len(decisions)
        kept: list[int] = []
        for position in pending.tolist():
            key = int(keys[position])
            if self.exact and key in seen_exact:
                decisions[position] = ("exact", group)
            elif any(kept_flags[other] for other in partners.get(position, ())) or any(
                    (sigs[position] == sigs[other]).mean() >= self.threshold
                    for bucket in crowded.get(position, ()) for other in buckets.get(bucket, ())):
                decisions[position] = ("near", group)
            else:
                seen_exact.add(key)
                kept_flags[position] = True
                kept.append(position)
                for bucket in crowded.get(position, ()):
                    buckets.setdefault(bucket, []).append(position)
        return kept
