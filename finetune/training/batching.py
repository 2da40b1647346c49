"""Which examples train together: packing several into one row, and the length-grouped order of batches.
Shared by the trainer and the memory plan, which replays the same order to find the widest batch."""
from __future__ import annotations

import bisect
import random

from finetune.data import IGNORE


def pack(rows: list[dict], capacity: int) -> list[dict]:
    """Best-fit-decreasing packing of examples into rows of at most `capacity` tokens. Every example
    keeps position ids 0..n-1, from which the model builds a block-diagonal causal mask: an example
    attends only to itself. Its first label is masked so no loss crosses a boundary."""
    longest = max(len(row["input_ids"]) for row in rows)
    if longest > capacity:
        raise SystemExit(f"train.packing_length ({capacity}) is shorter than the longest example ({longest} tokens); "
                         f"raise it to at least {longest}")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the tightest bin that fits is found by bisect
    for index in order:
        size = len(rows[index]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - size, len(bins) - 1))
        else:
            space, target = free.pop(slot)
            bins[target].append(index)
            bisect.insort(free, (space - size, target))
    packed = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            example = rows[index]
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE] + example["labels"][1:]
            row["position_ids"] += list(range(len(example["input_ids"])))
        packed.append(row)
    return packed


class LengthGroupedSampler:
    """Index order whose consecutive `batch_size` chunks hold examples of similar length, in an order
    shuffled from (seed, epoch) alone, so a resumed run replays exactly the batches it missed."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: bool, megabatches: int = 32):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.megabatch = batch_size * megabatches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group:
            return iter(order)
        batches = []
        for start in range(0, len(order), self.megabatch):
            chunk = sorted(order[start:start + self.megabatch], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        last = batches.pop() if len(batches[-1]) < self.batch_size else None  # a short batch stays last
        rng.shuffle(batches)
        # the widest batch first (as transformers' LengthGroupedSampler does): the heap, which keeps a step's freed
        # buffers for the next (device.reuse_heap_in_loop), grows to the run's largest shapes at once and every later,
        # narrower step fits in them, where a wide batch coming late found the heap cut up for narrower ones
        if batches:
            widest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(widest))
        return iter([index for batch in batches + ([last] if last else []) for index in batch])
