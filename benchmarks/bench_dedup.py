"""Near-dedup throughput: our chunked, vectorised index vs a plain per-document datasketch loop.

    python benchmarks/bench_dedup.py                  # 100k docs, both methods, same params
    python benchmarks/bench_dedup.py --docs 1000000 --skip-baseline   # memory at scale

Synthetic documents (random words) with planted near-duplicates: a copy of one of the last
5,000 documents with one word replaced (documents of 60-160 words, so the true 3-shingle Jaccard is >= 0.9, above the 0.8 threshold).
Reports docs/s for both, the speed ratio, recall of the planted duplicates, the false-positive
rate on the other documents, and the memory of our index and the process. Documents are
generated a chunk at a time; the flags (two bools per document) are the only per-document lists.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.data import minhash  # noqa: E402


def documents(count: int, planted_fraction: float, seed: int = 0, window: int = 5000):
    """Yield (text, planted) with deterministic content."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{index}" for index in range(30_000)]
    recent: deque[list[str]] = deque(maxlen=window)
    for _ in range(count):
        if recent and rng.random() < planted_fraction:
            words = list(recent[int(rng.integers(len(recent)))])
            words[int(rng.integers(len(words)))] = vocabulary[int(rng.integers(len(vocabulary)))]
            yield " ".join(words), True
        else:
            words = [vocabulary[i] for i in rng.integers(0, len(vocabulary), int(rng.integers(60, 160)))]
            recent.append(words)
            yield " ".join(words), False


def shingles(text: str, size: int) -> list[bytes]:
    words = text.split()
    return [" ".join(words[i:i + size]).encode() for i in range(max(len(words) - size + 1, 1))]


def chunks(iterable, size: int):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ours(args) -> tuple[float, list[bool], list[bool], int]:
    index = minhash.DedupIndex(args.threshold, args.num_perm, args.shingle_size)
    flagged, planted, seconds = [], [], 0.0
    for chunk in chunks(documents(args.docs, args.planted), args.chunk):
        texts = [text for text, _ in chunk]
        started = time.perf_counter()
        decisions = index.check(texts, "train")
        seconds += time.perf_counter() - started
        flagged += [decision is not None for decision in decisions]
        planted += [is_planted for _, is_planted in chunk]
    return seconds, flagged, planted, index.nbytes()


def baseline(args) -> tuple[float, list[bool]]:
    """What dedup code usually looks like: one MinHash per document, query, confirm, insert."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, weights=(0.1, 0.9))  # our bands
    kept: dict[int, MinHash] = {}
    flagged, seconds = [], 0.0
    for number, (text, _) in enumerate(documents(args.docs, args.planted)):
        started = time.perf_counter()
        signature = MinHash(num_perm=args.num_perm)
        signature.update_batch(shingles(text, args.shingle_size))
        duplicate = any(signature.jaccard(kept[key]) >= args.threshold for key in lsh.query(signature))
        if not duplicate:
            lsh.insert(number, signature)
            kept[number] = signature
        seconds += time.perf_counter() - started
        flagged.append(duplicate)
    return seconds, flagged


def quality(flagged: list[bool], planted: list[bool]) -> tuple[float, float]:
    flagged_array, planted_array = np.array(flagged), np.array(planted)
    recall = flagged_array[planted_array].mean()
    false_positive_rate = flagged_array[~planted_array].mean()
    return float(recall), float(false_positive_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--planted", type=float, default=0.1, help="fraction of planted near-duplicates")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--shingle-size", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8192, help="rows per chunk, as in dedup_filter")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    minhash.bands(args.threshold, args.num_perm)  # one-off parameter search, outside the timing

    seconds, flagged, planted, index_bytes = ours(args)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the baseline runs
    recall, false_positives = quality(flagged, planted)
    print(f"docs: {args.docs}, planted near-duplicates: {sum(planted)}, threshold {args.threshold}, "
          f"num_perm {args.num_perm}, shingle {args.shingle_size}")
    print(f"ours:     {args.docs / seconds:10.0f} docs/s  ({seconds:.1f} s)  recall {recall:.4f}  "
          f"false positives {false_positives:.4%}")
    print(f"ours:     index {index_bytes / 2**20:.0f} MiB ({index_bytes / args.docs:.0f} bytes/doc), "
          f"peak RSS of the process {peak_rss / 2**20:.0f} MiB (Python, numpy, datasketch, scipy included)")
    if not args.skip_baseline:
        base_seconds, base_flagged = baseline(args)
        base_recall, base_false_positives = quality(base_flagged, planted)
        agree = np.mean(np.array(base_flagged) == np.array(flagged))
        print(f"baseline: {args.docs / base_seconds:10.0f} docs/s  ({base_seconds:.1f} s)  recall {base_recall:.4f}  "
              f"false positives {base_false_positives:.4%}")
        print(f"speed-up: {base_seconds / seconds:.1f}x   same decision on {agree:.4%} of docs")


if __name__ == "__main__":
    main()
