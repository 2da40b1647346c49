"""Run by tests/test_device.py in a fresh interpreter: does the train stage's heap limit return freed blocks to
the OS? Prints whether the limit was applied and how many MiB the process kept after two steps.

    python tests/programs/heap_probe.py REPO_ROOT
"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from finetune.runtime import device

applied = device.limit_heap_retention()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]


def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024


def step():  # 128 MiB of 2 MiB blocks (activations) between small ones that outlive them, then freed
    blocks, small = [], []
    for _ in range(64):
        blocks.append(libc.malloc(2 << 20))
        ctypes.memset(blocks[-1], 1, 2 << 20)
        small.append(libc.malloc(256))
    for block in blocks:
        libc.free(block)
    return small


before = rss_mib()
# with glibc's default the first free of a 2 MiB block raises its mmap threshold past 2 MiB (if nothing before
# did), so from then on such blocks come from the heap, and the small blocks between them keep it from shrinking
kept = [step(), step()]
print(applied, round(rss_mib() - before))
