"""sandbox: run an untrusted generated program against its test cases, contained.

Each program runs in its own process, in layers that do not trust each other:
- namespaces (`unshare`, probed once): a new network namespace (only a downed loopback, so
  nothing can be reached); a new PID namespace whose first process is the harness, so every
  process the program starts dies with it; a new mount namespace in which the harness remounts
  the whole filesystem read-only except the program's throwaway working directory; as non-root
  also a user namespace (needed to create the others);
- resource limits set by the harness before the program runs: address space (memory), CPU
  seconds, file size, open files, no core dumps, and RLIMIT_NPROC=1 so it cannot fork;
- as root, the harness drops to the `nobody` user first (root ignores RLIMIT_NPROC, and
  nobody cannot touch the evaluator's files or signal its processes);
- a Python audit hook (`sys.addaudithook`, cannot be removed) that refuses sockets,
  process creation, signals, ctypes, and any write, delete, rename or mkdir outside the
  working directory;
- a wall-clock timeout in the parent, which kills the whole process group.
The program's stdout/stderr go to /dev/null; the harness reports results on a private fd,
each line tagged with a random nonce the program never sees in its inputs. Only the standard
library is available (`python -I -S`); common modules are imported before privileges drop,
because the interpreter's own folder may not be readable by `nobody`.
Threat model: buggy or misbehaving generated code, not an attacker who targets this harness.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

log = logging.getLogger("finetune.sandbox")

NOBODY = 65534
PREIMPORT = ["abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
             "decimal", "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools",
             "json", "math", "numbers", "operator", "pathlib", "random", "re", "shutil", "socket", "statistics",
             "string", "struct", "textwrap", "time", "typing", "unicodedata"]

HARNESS = r'''
import json, os, resource, sys
config = json.loads(sys.stdin.readline())
nonce = config.pop("nonce")
out = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)

def report(kind, index, ok, error=""):
    os.write(out, ("\n" + nonce + " " + json.dumps([kind, index, ok, str(error)[:300]]) + "\n").encode())

for name in config["preimport"]:
    try:
        __import__(name)
    except ImportError:
        pass
if config["readonly"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    here = os.getcwd()
    if libc.mount(here.encode(), here.encode(), None, 4096, None) != 0:  # MS_BIND: the workdir stays writable
        report("isolation", 0, False, "bind mount of the working directory failed: errno %d" % ctypes.get_errno())
    else:
        os.chdir(here)  # enter through the new mount: the old cwd sits on the mount about to turn read-only
        failed = []
        for line in open("/proc/self/mountinfo").read().splitlines():
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")
            if target == here:
                continue
            flags = 1 | 32 | 4096 | sum(KEEP.get(option, 0) for option in fields[5].split(","))  # RDONLY|REMOUNT|BIND
            if libc.mount(None, target.encode(), None, flags, None) != 0:
                failed.append(target)
        report("isolation", 0, not failed, "could not make read-only: " + " ".join(failed) if failed else "")
    del libc, ctypes
limits = config["limits"]
for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"):
    resource.setrlimit(getattr(resource, name), (limits[name], limits[name]))
if config["drop_to"] is not None:
    os.setgroups([])
    os.setgid(config["drop_to"])
    os.setuid(config["drop_to"])
resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))

if config["guard"]:
    def _guard(root):
        realpath, fsdecode = os.path.realpath, os.fsdecode
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        DENY = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
                "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                "sys.addaudithook"}
        PATHS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                 "os.truncate": 1, "os.link": 2, "os.symlink": 2, "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1,
                 "shutil.rmtree": 1, "os.chflags": 1}

        def inside(path):
            if isinstance(path, int):
                return True
            resolved = realpath(fsdecode(path))
            return resolved == root or resolved.startswith(root + "/")

        def hook(event, args):
            if event in DENY:
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open" and (args[2] or 0) & WRITE and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
            if event in PATHS and not all(inside(path) for path in args[:PATHS[event]]):
                raise PermissionError(f"sandbox: {event} outside the working directory")
        sys.addaudithook(hook)
    _guard(os.path.realpath(os.getcwd()))
    del _guard

try:
    code = compile(config["source"], "candidate.py", "exec")
    report("syntax", 0, True)
except BaseException as exc:
    code = None
    report("syntax", 0, False, f"{type(exc).__name__}: {exc}")
namespace = {"__name__": "candidate"}
load_error = "the program does not compile"
if code is not None:
    try:
        exec(code, namespace)
        load_error = None
    except BaseException as exc:
        load_error = f"the program failed to load: {type(exc).__name__}: {exc}"
for index, test in enumerate(config["tests"]):
    if load_error is not None:
        report("test", index, False, load_error)
        continue
    try:
        exec(test, namespace)
        report("test", index, True)
    except BaseException as exc:
        report("test", index, False, f"{type(exc).__name__}: {exc}")
report("done", 0, True)
'''


@dataclass
class Outcome:
    status: str  # finished | timeout | crashed (ended without reporting, e.g. killed by a limit)
    syntax_ok: bool = False
    passed: list[bool] = field(default_factory=list)  # one per test case
    errors: list[str] = field(default_factory=list)
    harness_output: str = ""  # what the harness printed besides its reports (its own errors, if any)

    @property
    def all_passed(self) -> bool:
        return self.status == "finished" and bool(self.passed) and all(self.passed)


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
    """Run `source`, then each test case (a statement, usually an `assert`), contained; never raises
    for anything the program does."""
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    root = os.geteuid() == 0
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    nonce = secrets.token_hex(16)
    config = {"nonce": nonce, "source": source, "tests": tests, "guard": guard, "preimport": PREIMPORT,
              "readonly": bool(namespace_command()),
              "drop_to": NOBODY if root else None,
              "limits": {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout_seconds) + 1,
                         "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}}
    command = [*namespace_command(), sys.executable, "-I", "-S", "-B", "-c", HARNESS]
    try:
        with tempfile.TemporaryFile() as results:
            process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.PIPE, stdout=results,
                                       stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                       start_new_session=True)
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
            text = results.read(1 << 20).decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return parse_report(text, nonce, len(tests), timed_out)


def parse_report(text: str, nonce: str, test_count: int, timed_out: bool) -> Outcome:
    outcome = Outcome(status="timeout" if timed_out else "crashed", passed=[False] * test_count,
                      errors=[""] * test_count)
    for line in text.splitlines():
        if not line.startswith(nonce + " "):
            continue
        kind, index, ok, error = json.loads(line[len(nonce) + 1:])
        if kind == "syntax":
            outcome.syntax_ok = ok
        elif kind == "test" and 0 <= index < test_count:
            outcome.passed[index], outcome.errors[index] = ok, error
        elif kind == "isolation" and not ok:
            log.warning("sandbox: %s", error)
        elif kind == "done" and not timed_out:
            outcome.status = "finished"
    outcome.harness_output = "\n".join(line for line in text.splitlines() if line and not line.startswith(nonce))[-2000:]
    return outcome


def check_works(timeout_seconds: float = 10.0) -> None:
    """A correct program must pass: otherwise every generated program would silently score 0."""
    outcome = run_tests("def add(a, b):\n    return a + b\n", ["assert add(2, 3) == 5"], timeout_seconds)
    if not outcome.all_passed:
        raise SystemExit(f"sandbox: a known-good program did not pass ({outcome.status}, {outcome.errors}); "
                         f"the harness said: {outcome.harness_output or '(nothing)'}")
