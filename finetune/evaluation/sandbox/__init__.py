"""sandbox: run an untrusted generated program against its test cases, contained, and judge every test
where the program cannot reach.

Two processes per program. The judge, started by the evaluator, never runs a line of the program: it
forks the candidate, which runs the program and answers the judge's requests on a pipe ("the name
`add`", "call handle 3 on (2, 3)"). The judge evaluates each test's `assert` itself, in its own
untouched interpreter. The program's functions and objects stand in as handles into the candidate,
which the judge asks only for values (a call's result, an attribute, the items, the length), and these
come back as plain data (numbers, strings, bytes, None, and lists, tuples, dicts and sets of them, by
exact type; a subclass travels as its base value) in tagged json. It never asks for a verdict: a value
of the program's that is not plain data fails a comparison with plain data and a truth test. So an
`__eq__` that always says yes, a patched `sorted` or `math.isclose`, or a swapped `sys.modules` entry
cannot pass a test. What the judge cannot evaluate this way (two of the program's objects compared, a
lambda passed to it, a test that is not one `assert`) runs inside the candidate as before, reported as
unverified.

The candidate holds nothing of the judge's: its fds are /dev/null and its pipe, the judge's module
globals are cleared, and the judge is not dumpable (no /proc/<judge>/fd, no ptrace). With every answer
it reports changes to the builtins, `sys.modules` and the standard library modules the tests use: such a
test fails and the program is reported suspicious, as are values whose own class (the program's)
decides comparisons, a redefined builtin a test uses, and anything on the pipe the judge did not ask
for. Those reports come from the program's own process, so a program that rewrites the candidate's code
through its frames can silence them; it still cannot pass a verified test with a wrong value.

Containment, in layers that do not trust each other:
- namespaces (`unshare`, probed once): a new network namespace (only a downed loopback, so nothing
  can be reached); a new PID namespace whose first process is the judge, so every process the program
  starts dies with it; a new mount namespace in which the judge remounts the whole filesystem
  read-only except the program's throwaway working directory; as non-root also a user namespace
  (needed to create the others), whose capabilities the candidate drops;
- resource limits: address space (memory), CPU seconds, file size, open files, no core dumps, and
  RLIMIT_NPROC=1 in the candidate so it cannot fork;
- as root, the judge drops to the `nobody` user before forking (root ignores RLIMIT_NPROC, and nobody
  cannot touch the evaluator's files or signal its processes);
- a Python audit hook in the candidate (`sys.addaudithook`, cannot be removed) that refuses sockets,
  process creation, signals, ctypes, gc's object walks, and any write, delete, rename or mkdir outside
  the working directory;
- a wall-clock timeout in the evaluator, which kills the whole process group.
Only the standard library is available (`python -I -S`); common modules are imported before privileges
drop, because the interpreter's own folder may not be readable by `nobody`.

The two programs are files beside this module, read at run time: judge.py and candidate.py, each run with
codec.py (their shared wire format) ahead of it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("finetune.sandbox")

NOBODY = 65534
PREIMPORT = ["abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
             "decimal", "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools",
             "json", "math", "numbers", "operator", "pathlib", "random", "re", "shutil", "socket", "statistics",
             "string", "struct", "textwrap", "time", "typing", "unicodedata"]


@functools.lru_cache(maxsize=None)
def program(name: str) -> str:
    """The text the judge's or the candidate's interpreter runs: codec.py, then the program file `name`
    (both beside this module); they run with `python -I -S`, so neither can import the other."""
    here = Path(__file__).parent
    return (here / "codec.py").read_text() + (here / name).read_text()


@dataclass
class Outcome:
    status: str  # finished | timeout | crashed (the program's process or the judge ended before the end)
    syntax_ok: bool = False
    passed: list[bool] = field(default_factory=list)  # one per test case
    errors: list[str] = field(default_factory=list)
    harness_output: str = ""  # what the judge wrote on stderr (its own errors, if any)
    verified: list[bool] = field(default_factory=list)  # per test: False when it ran inside the program's process
    suspicions: list[str] = field(default_factory=list)  # signs that the program tried to fake its score

    @property
    def suspicious(self) -> bool:
        return bool(self.suspicions)

    @property
    def all_passed(self) -> bool:
        return self.status == "finished" and bool(self.passed) and all(self.passed) and not self.suspicions


@functools.lru_cache(maxsize=None)
def namespace_command() -> tuple[str, ...]:
    """The `unshare` prefix that works on this machine, or () with a warning when none does."""
    unshare = shutil.which("unshare")
    flags = ["--net", "--pid", "--mount", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        flags = ["--user", "--map-root-user", *flags]
    try:
        works = bool(unshare) and subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    if not works:
        log.warning("sandbox: no network/PID namespaces here (`unshare %s` failed); generated code is contained by "
                    "resource limits and the audit hook only", " ".join(flags))
        return ()
    return (unshare, *flags, "--")


def isolation() -> dict:
    """What contains generated code on this machine, for the logs and the README."""
    return {"namespaces": bool(namespace_command()), "user": "nobody" if os.geteuid() == 0 else "self"}


def run_tests(source: str, tests: list[str], timeout_seconds: float = 5.0, memory_mb: int = 512,
              guard: bool = True) -> Outcome:
    """Run `source` contained and judge each test case (a statement, usually an `assert`) outside its
    reach; never raises for anything the program does."""
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    root = os.geteuid() == 0
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    config = {"source": source, "tests": tests, "guard": guard, "preimport": PREIMPORT,
              "candidate": program("candidate.py"), "readonly": bool(namespace_command()),
              "drop_to": NOBODY if root else None,
              "limits": {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout_seconds) + 1,
                         "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}}
    command = [*namespace_command(), sys.executable, "-I", "-S", "-B", "-c", program("judge.py")]
    try:
        with tempfile.TemporaryFile() as results, tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.PIPE, stdout=results, stderr=errors,
                                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            try:
                process.stdin.write(json.dumps(config).encode() + b"\n")
                process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                process.wait(timeout=timeout_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group
                except ProcessLookupError:
                    pass
                process.wait()
            results.seek(0)
            errors.seek(0)
            text, stderr = results.read(1 << 20).decode("utf-8", "replace"), errors.read(1 << 20).decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return parse_report(text, len(tests), timed_out, stderr)


def parse_report(text: str, test_count: int, timed_out: bool, stderr: str = "") -> Outcome:
    """The judge's report: one json list per line, on a file only the judge holds."""
    outcome = Outcome(status="timeout" if timed_out else "crashed", passed=[False] * test_count,
                      errors=[""] * test_count, verified=[True] * test_count, harness_output=stderr[-2000:])
    for line in text.splitlines():
        try:
            kind, *fields = json.loads(line)
        except ValueError:
            outcome.harness_output = (outcome.harness_output + "\n" + line)[-2000:]
            continue
        if kind == "syntax":
            outcome.syntax_ok = fields[0]
        elif kind == "test" and 0 <= fields[0] < test_count:
            index = fields[0]
            outcome.passed[index], outcome.errors[index], outcome.verified[index] = fields[1:]
        elif kind == "suspicious":
            outcome.suspicions.append(fields[0])
        elif kind == "isolation" and not fields[0]:
            log.warning("sandbox: %s", fields[1])
        elif kind == "done" and not timed_out:
            outcome.status = "crashed" if fields[0] else "finished"
    return outcome


def check_works(timeout_seconds: float = 10.0) -> None:
    """A correct program must pass: otherwise every generated program would silently score 0."""
    outcome = run_tests("def add(a, b):\n    return a + b\n", ["assert add(2, 3) == 5"], timeout_seconds)
    if not outcome.all_passed or not all(outcome.verified):
        raise SystemExit(f"sandbox: a known-good program did not pass ({outcome.status}, {outcome.errors}); "
                         f"the judge said: {outcome.harness_output or '(nothing)'}")
