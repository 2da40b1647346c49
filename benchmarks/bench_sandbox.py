"""Per-program cost of the code sandbox: the working tree's (finetune/evaluation/sandbox/) vs a committed
version (`--rev`: the package of program files, or the single module of older layouts, finetune/evaluation/
sandbox.py or stages/sandbox.py, such as the one harness process the judge + candidate pair replaced).

    python benchmarks/bench_sandbox.py [--programs 30] [--rounds 2] [--rev HEAD]

Runs the coding example's reference programs (examples/coding/data.jsonl), every other one broken so
that both verdicts are timed, through both versions, interleaved program by program so that a change
in machine load hits both alike. Both must give the same verdicts (checked). Prints the mean and
median milliseconds per program, their ratio, the CPUs and threads available, and the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


PACKAGE = "finetune/evaluation/sandbox"
MODULES = ["finetune/evaluation/sandbox.py", "stages/sandbox.py"]  # older layouts, newest first


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def committed_sandbox(rev: str):
    """The sandbox as committed at `rev`, loaded from a temp folder under another name: the package with its
    program files beside it, or an older layout's single module."""
    folder = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    files = git("ls-tree", "--name-only", rev, f"{PACKAGE}/").stdout.split()
    if files:
        folder = folder / "sandbox_before"
        folder.mkdir()
        for path in files:
            (folder / Path(path).name).write_text(git("show", f"{rev}:{path}").stdout)
        spec = importlib.util.spec_from_file_location("sandbox_before", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
    else:
        found = next((path for path in MODULES if git("cat-file", "-e", f"{rev}:{path}").returncode == 0), None)
        if found is None:
            raise SystemExit(f"no sandbox at {rev}: neither {PACKAGE}/ nor {' nor '.join(MODULES)}")
        (folder / "sandbox_before.py").write_text(git("show", f"{rev}:{found}").stdout)
        spec = importlib.util.spec_from_file_location("sandbox_before", folder / "sandbox_before.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_before"] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module


def programs(count: int) -> list[tuple[str, list[str]]]:
    """(source, tests) of the coding example; every second program returns None, so it fails."""
    rows = [json.loads(line) for line in (ROOT / "examples" / "coding" / "data.jsonl").read_text().splitlines()]
    chosen = []
    for index, row in enumerate(rows[:count]):
        tests = [line.strip() for line in row["instruction"].splitlines() if re.match(r"\s*assert\b", line)]
        source = row["output"] if index % 2 == 0 else re.sub(r"return .*", "return None", row["output"])
        chosen.append((source, tests))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the programs")
    parser.add_argument("--rev", default="HEAD", help="the committed version to compare with")
    args = parser.parse_args()

    from finetune.evaluation import sandbox

    before = committed_sandbox(args.rev)
    versions = {f"before ({args.rev})": before, "after (working tree)": sandbox}
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    chosen = programs(args.programs)
    for name, module in versions.items():  # warm-up: the namespace probe and the page cache
        module.run_tests(*chosen[0])
    for round_index in range(args.rounds):
        for index, (source, tests) in enumerate(chosen):
            order = list(versions.items())
            if (index + round_index) % 2:
                order.reverse()
            verdicts = {}
            for name, module in order:
                started = time.perf_counter()
                outcome = module.run_tests(source, tests)
                seconds[name].append(time.perf_counter() - started)
                verdicts[name] = (outcome.status, outcome.passed)
            if len(set(map(str, verdicts.values()))) != 1:
                raise SystemExit(f"program {index}: the versions disagree: {verdicts}")
    print(f"{len(chosen)} programs x {args.rounds} rounds, {sum(len(tests) for _, tests in chosen)} tests a round; "
          f"same verdicts in both versions")
    for name, values in seconds.items():
        print(f"  {name:22s} mean {1000 * statistics.mean(values):6.1f} ms/program   "
              f"median {1000 * statistics.median(values):6.1f} ms")
    means = [statistics.mean(values) for values in seconds.values()]
    medians = [statistics.median(values) for values in seconds.values()]
    print(f"ratio after/before: mean {means[1] / means[0]:.2f}x, median {medians[1] / medians[0]:.2f}x")
    print(f"cpus available {len(os.sched_getaffinity(0))}, threads in this process {threading.active_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
