"""Run by tests/test_device.py in a fresh interpreter: does the train stage's heap limit return freed blocks to
the OS? Prints whether the limit was applied and how many MiB glibc's heap (its main arena, as mallinfo2
counts it) grew by and kept after two steps. The allocator's own count, not the process RSS, so that how a
sandbox reports RSS does not enter it.

    python tests/programs/heap_probe.py REPO_ROOT
"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from finetune.runtime import device

applied = device.limit_heap_retention()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]


class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc.mallinfo2.restype = MallInfo2


def heap_mib():  # bytes glibc has taken from the OS with brk and still holds: what it keeps freed blocks in
    return libc.mallinfo2().arena / 2**20


def step():  # 128 MiB of 2 MiB blocks (activations) between small ones that outlive them, then freed
    blocks, small = [], []
    for _ in range(64):
        blocks.append(libc.malloc(2 << 20))
        ctypes.memset(blocks[-1], 1, 2 << 20)
        small.append(libc.malloc(256))
    for block in blocks:
        libc.free(block)
    return small


before = heap_mib()
# with glibc's default the first free of a 2 MiB block raises its mmap threshold past 2 MiB (if nothing before
# did), so from then on such blocks come from the heap, and the small blocks between them keep it from shrinking
kept = [step(), step()]
print(applied, round(heap_mib() - before))
