"""The vectorised MinHash index behind dedup_filter: datasketch's numbers, any chunking, no misses."""
import numpy as np
import pytest
from datasketch import MinHash

from finetune.data import minhash


def documents(count, seed=0):
    """Random 60-100 word documents; every 5th is an earlier one with one word replaced (Jaccard >= 0.9)."""
    rng = np.random.default_rng(seed)
    docs, planted, originals = [], [], []
    for index in range(count):
        if index % 5 == 4:
            words = originals[int(rng.integers(len(originals)))].split()
            words[int(rng.integers(len(words)))] = "replaced"
            docs.append(" ".join(words))
        else:
            originals.append(" ".join(f"w{i}" for i in rng.integers(0, 5000, int(rng.integers(60, 100)))))
            docs.append(originals[-1])
        planted.append(index % 5 == 4)
    return docs, planted


def test_signatures_are_datasketch_minhashes_of_the_shingle_values():
    hasher = minhash.Hasher(64, 3)
    texts = ["the quick brown fox jumps over the lazy dog " * 2, "two words", "", "one", "a b c", "x \x00\x01 y z"]
    values, counts = hasher.shingle_values(texts)
    assert counts.tolist() == [16, 1, 1, 1, 1, 2]  # word 3-grams; a shorter text is one shingle
    signatures, ends = hasher.signatures(texts), np.cumsum(counts)
    for index in range(len(texts)):
        reference = MinHash(num_perm=64, hashfunc=int)
        reference.update_batch(values[ends[index] - counts[index]:ends[index]])
        assert (reference.hashvalues == signatures[index]).all()
    assert len(set(values[:16].tolist())) == 9  # a 9-word sentence twice: equal shingles hash equal


def test_estimated_jaccard_tracks_the_true_one():
    words = [f"w{i}" for i in range(200)]
    edited = words[:100] + ["new"] + words[101:]  # 3 of 198 shingles change
    first, second = minhash.Hasher(256, 3).signatures([" ".join(words), " ".join(edited)])
    assert abs((first == second).mean() - 195 / 201) < 0.04


def test_sorted_runs_find_every_equal_key():
    rng = np.random.default_rng(0)
    runs, reference, row = minhash.SortedRuns(), {}, 0
    for size in [5, 7, 3, 20, 1, 9, 64]:
        keys = rng.integers(0, 40, size)
        runs.add(keys, np.arange(row, row + size))
        for key in keys.tolist():
            reference.setdefault(key, []).append(row)
            row += 1
    assert len(runs.runs) <= 3  # merged like a binary counter
    queries = rng.integers(0, 50, 100)
    positions, rows = runs.find(queries)
    assert sorted(zip(positions.tolist(), rows.tolist())) == sorted(
        (index, value) for index, key in enumerate(queries.tolist()) for value in reference.get(key, []))


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_index_decisions_do_not_depend_on_chunking(chunk):
    docs, planted = documents(500)
    index = minhash.DedupIndex(0.8, 128, 3)
    decisions = [d for start in range(0, len(docs), chunk) for d in index.check(docs[start:start + chunk], "train")]
    assert [decision is not None for decision in decisions] == planted  # every planted copy, nothing else
    assert {decision for decision in decisions if decision} == {("near", "train")}
    assert index.size == planted.count(False) and index.nbytes() > 0

    later = index.check([docs[4], docs[0], "w1 w2 w3 brand new"], "eval")
    assert later == [("near", "train"), ("exact", "train"), None]
    assert index.check(["w1  w2 w3 brand new"], "test") == [("near", "eval")]  # not the same text, same words


def test_exact_only_and_near_only():
    docs = ["a b c d e f g h", "a b c d e f g h", "a b c d e f g x"]
    assert minhash.DedupIndex(0.5, 64, 1, near=False).check(docs, "train") == [None, ("exact", "train"), None]
    near_only = minhash.DedupIndex(0.5, 64, 1, exact=False).check(docs, "train")
    assert near_only == [None, ("near", "train"), ("near", "train")]


def test_a_crowd_of_boilerplate_rows_is_cheap_and_keeps_one():
    body = " ".join(f"word{i}" for i in range(60))
    crowd = [f"{body} order {number}" for number in range(3000)]  # one chunk, all near one another
    crowd += [body + " " + " ".join(f"new{i}" for i in range(40))]  # shares the start, Jaccard ~0.6: kept
    decisions = minhash.DedupIndex(0.8, 128, 3).check(crowd, "train")
    assert [position for position, decision in enumerate(decisions) if decision is None] == [0, 3000]
