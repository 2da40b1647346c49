"""Per-program cost of the code sandbox: the judge + candidate pair (stages/sandbox.py) vs the single
harness process it replaced (the committed `git show <rev>:stages/sandbox.py`).

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


def committed_sandbox(rev: str):
    """The sandbox module as committed at `rev`, loaded from a temp file under another name."""
    source = subprocess.run(["git", "show", f"{rev}:stages/sandbox.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-sandbox-")) / "sandbox_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sandbox_before", path)
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
