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

log = logging.getLogger("finetune.sandbox")

NOBODY = 65534
PREIMPORT = ["abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
             "decimal", "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools",
             "json", "math", "numbers", "operator", "pathlib", "random", "re", "shutil", "socket", "statistics",
             "string", "struct", "textwrap", "time", "typing", "unicodedata"]

# Shared by the judge and the candidate: plain data as json with type tags, in length-prefixed frames.
CODEC = r'''
import itertools, json, os


class NotPlain(Exception):
    """args[0]: the type that is not plain data, or why the value cannot travel."""


SMALL = 1 << 62  # bigger ints travel as hex: json refuses ints of over 4300 digits
SCALARS = {type(None), bool, int, float, str}
TAGS = {list: "L", tuple: "T", set: "S", frozenset: "F"}
BUILD = {"L": list, "T": tuple, "S": set, "F": frozenset}


def scalars(items):
    """Whether all `items` go into json as they are; checked at C speed, so that a list of a million
    numbers costs a fraction of a second, not seconds."""
    kinds = set(map(type, items))
    if int not in kinds:
        return kinds <= SCALARS
    return kinds <= {int, bool} and -SMALL < min(items) and max(items) < SMALL


def encode(value, other=None, depth=0):
    """Plain data by exact type (a subclass could bring its own __eq__); `other(value, depth)` encodes
    anything else or raises NotPlain."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is str:
        return value
    if kind is int:
        return value if -SMALL < value < SMALL else ["I", format(value, "x")]
    if depth > 100:
        raise NotPlain("nested over 100 deep")
    if kind in TAGS or kind is dict:
        items = list(itertools.chain.from_iterable(value.items())) if kind is dict else list(value)
        return [TAGS.get(kind, "D"), *(items if scalars(items) else (encode(item, other, depth + 1) for item in items))]
    if kind is bytes:
        return ["B", value.hex()]
    if kind is complex:
        return ["C", value.real, value.imag]
    if other is None:
        raise NotPlain(kind)
    return other(value, depth)


def decode(data, handles=None, depth=0):
    """The inverse of encode, strict; ["H", i] is the candidate's handles[i] where it keeps them."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is not list or not data or type(data[0]) is not str or depth > 100:
        raise ValueError("not an encoded value")
    if data[0] == "H" and handles is not None and len(data) == 2 and type(data[1]) is int and data[1] >= 0:
        return handles[data[1]]
    tag, items = data[0], data[1:]
    if not set(map(type, items)) <= SCALARS:
        items = [decode(item, handles, depth + 1) for item in items]
    if tag in BUILD:
        return BUILD[tag](items)
    if tag == "D" and len(items) % 2 == 0:
        return dict(zip(items[::2], items[1::2]))
    if tag in ("I", "B") and len(items) == 1 and type(items[0]) is str:
        return int(items[0], 16) if tag == "I" else bytes.fromhex(items[0])
    if tag == "C" and len(items) == 2 and all(type(item) is float for item in items):
        return complex(*items)
    raise ValueError("not an encoded value")


def send(fd, message):
    data = json.dumps(message, separators=(",", ":"), check_circular=False).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd, limit=64 << 20):
    size = int.from_bytes(read_exactly(fd, 4), "big")
    if size > limit:
        raise ValueError("an oversized message")
    return json.loads(read_exactly(fd, size))


def read_exactly(fd, size):
    data = bytearray()  # not bytes: += would copy all that came before, chunk after chunk
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
'''

# The judge: the first process in the namespaces. It sets up the OS layer, forks the candidate, and then
# evaluates every test itself; it never runs the program's code.
JUDGE = CODEC + r'''
import ast, builtins, ctypes, resource, sys
config = json.loads(sys.stdin.readline())
os.dup2(os.open(os.devnull, os.O_RDWR), 0)


def report(*fields):  # fd 1 is the evaluator's result file: only this process holds it
    os.write(1, (json.dumps(fields) + "\n").encode())


def assertion(test):
    """The test's `assert` node when the test is one assert statement, else None."""
    try:
        body = ast.parse(test).body
    except (SyntaxError, ValueError):
        return None
    return body[0] if len(body) == 1 and isinstance(body[0], ast.Assert) else None


def module_names(node):
    """Standard library modules the test uses as `module.attribute`: the judge binds its own copies."""
    roots = {part.value.id for part in ast.walk(node)
             if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)}
    called = {part.func.id for part in ast.walk(node) if isinstance(part, ast.Call) and isinstance(part.func, ast.Name)}
    return (roots - called) & sys.stdlib_module_names


asserts = [assertion(test) for test in config["tests"]]
modules_used = [module_names(node) if node else set() for node in asserts]
for name in config["preimport"] + sorted(set().union(*modules_used)):
    try:
        __import__(name)
    except ImportError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
if config["readonly"]:
    KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    here = os.getcwd()
    if libc.mount(here.encode(), here.encode(), None, 4096, None) != 0:  # MS_BIND: the workdir stays writable
        report("isolation", False, "bind mount of the working directory failed: errno %d" % ctypes.get_errno())
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
        report("isolation", not failed, "could not make read-only: " + " ".join(failed) if failed else "")
limits = config["limits"]
for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"):
    resource.setrlimit(getattr(resource, name), (limits[name], limits[name]))
if config["drop_to"] is not None:
    os.setgroups([])
    os.setgid(config["drop_to"])
    os.setuid(config["drop_to"])
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the candidate (same user) cannot open /proc/<judge>/fd or ptrace it

requests, replies = os.pipe(), os.pipe()  # (read, write): judge -> candidate, candidate -> judge
judge_pid = os.getpid()
candidate_pid = os.fork()
if candidate_pid == 0:  # CANDIDATE clears this module's globals first, and never returns
    os.close(requests[1])
    os.close(replies[0])
    exec(config["candidate"], {"__builtins__": builtins, "channel": (requests[0], replies[1]), "libc": libc,
                               "source": config["source"], "guard": config["guard"], "judge_pid": judge_pid,
                               "watched": sorted(set().union(*modules_used))})
os.close(requests[0])
os.close(replies[1])


class Ended(Exception):
    """The candidate's process ended (os._exit, a signal, a limit)."""


class Broken(Exception):
    """Something on the pipe the judge did not ask for: no later answer can be trusted."""


class Unverifiable(Exception):
    """The test needs more of the program's objects than values: it runs inside the candidate, unverified."""


class Raised(Exception):
    """The program's code raised: the test fails with its message."""


suspicions = []
notes = []  # what the candidate reported during the current test: changes to what the tests rely on
weak = []  # comparisons of two of the program's objects in the current test: the program decided them
AS_ITSELF = {"AttributeError": AttributeError, "StopIteration": StopIteration, "TypeError": TypeError}


def suspect(reason):
    if reason not in suspicions:
        suspicions.append(reason)
        report("suspicious", reason)


UNASKED = "the candidate's process wrote a message on its pipe that the judge did not ask for"


def listen():
    """The candidate's next message."""
    try:
        return receive(replies[0])
    except EOFError:
        raise Ended
    except (ValueError, RecursionError, MemoryError) as exc:
        raise Broken(f"the candidate's process wrote {exc or 'a malformed message'} on its pipe")


def ask(request):
    request["id"] = ident = int.from_bytes(os.urandom(7), "big")  # an answer written ahead cannot match it
    try:
        send(requests[1], request)
    except BrokenPipeError:
        raise Ended
    reply = listen()
    if (type(reply) is not dict or type(reply.get("id")) is not int or reply["id"] != ident or "result" not in reply
            or type(reply.get("notes")) is not list or not all(type(note) is str for note in reply["notes"])):
        raise Broken(UNASKED)
    notes.extend(reply["notes"])
    return reply["result"]


class Remote:
    """A value of the program's that is not plain data (a function, an object of its class, a generator):
    it stays in the candidate. The judge asks there for values computed from it (a call, an attribute, its
    items, its length, its float, ...), which come back as plain data or as further Remotes. It never
    asks for a verdict: comparing a Remote with plain data, or testing its truth, fails the test, since
    only its own methods could decide that; comparing two of them is asked of the candidate, unverified.
    Its only attribute is a mangled name, so that every attribute a test reads is the program's."""
    __slots__ = ("__info",)

    def __init__(self, what, kind, decides, handle, callable_):
        self.__info = (what, kind, decides, handle, callable_)

    def __call__(self, *args, **kwargs):
        what, kind, _, _, callable_ = self.__info
        if not callable_:
            raise TypeError(f"'{kind}' object is not callable")
        return use(self, "call", f"{what}(...)", *args, **kwargs)

    def __getattr__(self, name):
        return use(self, "getattr", f"{self.__info[0]}.{name}", name)

    def __iter__(self):
        return iter(use(self, "iter", self.__info[0]))

    def __contains__(self, item):  # decided here, over its items, not by its own __contains__
        return any(item is member or item == member for member in self)

    def __repr__(self):
        return f"<{self.__info[1]} of the program>"

    def __bool__(self):
        fail(self)

    def __hash__(self):
        raise Unverifiable


def use(remote, op, what, *args, **kwargs):
    try:
        arguments = {"args": encode(list(args), refer), "kwargs": encode(kwargs, refer)}
    except NotPlain:
        raise Unverifiable  # a lambda of the test's, say: it cannot travel
    return bind(what, ask({"kind": "apply", "handle": remote._Remote__info[3], "op": op, **arguments}))


def refer(value, depth):
    if type(value) is Remote:
        return ["H", value._Remote__info[3]]
    raise NotPlain(type(value))


def fail(remote):
    what, kind, decides, _, _ = remote._Remote__info
    if decides:
        suspect(f"{what} gave a {kind} object, whose class (the program's) decides comparisons")
    raise NotPlain(f"{what} gave a {kind} object, not plain data (numbers, strings, bytes, None, and lists, "
                   "tuples, dicts and sets of them), so the judge cannot compare it")


def compare(op):
    def comparison(self, other):
        if type(other) is Remote:
            weak.append(op)
            return use(self, op, f"{self._Remote__info[0]} {op} {other._Remote__info[0]}", other)
        try:
            encode(other)
        except NotPlain:
            raise Unverifiable  # an object of the test's own (a range, a Fraction)
        fail(self)
    return comparison


def compute(op):
    return lambda self, *args: use(self, op, f"{op.lstrip('r')}({self._Remote__info[0]})", *args)


ARITHMETIC = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")
for op in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Remote, f"__{op}__", compare(op))
for op in ("len", "next", "getitem", "str", "float", "int", "index", "complex", "abs", "neg", "pos", *ARITHMETIC,
           *("r" + op for op in ARITHMETIC)):
    setattr(Remote, f"__{op}__", compute(op))


def bind(what, answer):
    """The judge's stand-in for what the candidate answered."""
    kind, detail = (answer[0], answer[1:]) if type(answer) is list and answer and type(answer[0]) is str else ("", [])
    if kind == "value" and len(detail) == 1:
        try:
            return decode(detail[0])
        except (ValueError, TypeError, RecursionError):
            raise Broken("the candidate's process sent a malformed value")
    if kind == "raised" and len(detail) == 1 and type(detail[0]) is str:
        name, _, message = detail[0].partition(": ")
        if name in AS_ITSELF:  # so that Python's own fallbacks work: hasattr(), next(it, default), length hints
            raise AS_ITSELF[name](message)
        raise Raised(detail[0][:300])
    if kind == "items" and len(detail) == 1 and type(detail[0]) is list:
        return [bind(f"an item of {what}", item) for item in detail[0]]
    if kind == "object" and [type(part) for part in detail] == [str, bool, int, bool]:
        return Remote(what, *detail)
    raise Broken("the candidate's process sent a malformed answer")


def judge(node, test, modules):
    """(passed, error, verified) of one test."""
    if node is None:
        return in_candidate(test)
    names = sorted({name.id for name in ast.walk(node.test) if isinstance(name, ast.Name)})
    found = ask({"kind": "names", "names": names})
    scope = {"__builtins__": builtins}
    for name in names:
        answer = found.get(name) if type(found) is dict else None
        if answer == ["absent"]:
            continue
        if hasattr(builtins, name):
            suspect(f"the program redefines `{name}`, which a test uses")
            return False, f"the program redefines `{name}`, which the test uses", True
        # the test's `math.isclose` is the judge's own math.isclose, whatever the program did to its copy
        scope[name] = sys.modules[name] if name in modules and name in sys.modules else bind(name, answer)
    del weak[:]
    try:
        if eval(compile(ast.Expression(node.test), "<test>", "eval"), scope):
            return True, "", not weak
        try:
            message = str(ast.literal_eval(node.msg)) if node.msg else ""
        except Exception:  # a message that is not a literal is not evaluated: it could call the program
            message = ""
        return False, f"AssertionError: {message}", not weak
    except Unverifiable:
        return in_candidate(test)
    except (Ended, Broken):
        raise
    except (NotPlain, Raised) as exc:
        return False, str(exc)[:300], True
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300], not weak


def ran(answer):
    """The error of code the candidate ran ("" when it ran through)."""
    if answer == ["ok"]:
        return ""
    if type(answer) is list and len(answer) == 2 and answer[0] == "raised" and type(answer[1]) is str:
        return answer[1]
    raise Broken("the candidate's process sent a malformed answer")


def in_candidate(test):  # the weaker judgement of before: the program's process runs the whole test
    error = ran(ask({"kind": "exec", "test": test}))
    return not error, error, False


def ended():
    _, status = os.waitpid(candidate_pid, 0)
    return "the program ended its process (%s)" % (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                                                   else f"exit status {os.WEXITSTATUS(status)}")


crashed, failure = False, None
try:
    first = listen()  # sent before any of the program's code ran: it cannot be forged
    if "error" in first:
        os.write(2, (first["error"] + "\n").encode())
        raise Ended
    report("syntax", first["syntax"])
    failure = None if first["syntax"] else "the program does not compile"
    if failure is None:  # the program's module ran, unasked: a forged message here puts the ids out of step
        loaded = listen()
        if type(loaded) is not dict or type(loaded.get("loaded")) is not str:
            raise Broken(UNASKED)
        failure = f"the program failed to load: {loaded['loaded']}" if loaded["loaded"] else None
except Ended:
    crashed, failure = True, ended()
except Broken as exc:
    suspect(str(exc))
    failure = str(exc)
for index, test in enumerate(config["tests"]):
    if failure is not None:
        report("test", index, False, failure, True)
        continue
    del notes[:]
    try:
        passed, error, verified = judge(asserts[index], test, modules_used[index])
    except Ended:
        crashed, failure = True, ended()
        passed, error, verified = False, failure, True
    except Broken as exc:
        suspect(str(exc))
        passed, error, verified, failure = False, str(exc), True, str(exc)
    for note in notes:  # a change to what the tests rely on: this test fails, whatever it evaluated to
        suspect(note)
    if notes:
        passed, error = False, notes[0]
    report("test", index, passed, error, verified)
if not crashed:
    os.kill(candidate_pid, 9)
    os.waitpid(candidate_pid, 0)
report("done", crashed)
'''

# The candidate: forked from the judge. It drops what it inherited, runs the program, and answers the
# judge's requests. Nothing it answers is trusted: it can only ever be a value the program produced.
CANDIDATE = CODEC + r'''
import builtins, ctypes, operator, resource, sys, types

sys.modules["__main__"].__dict__.clear()  # the judge's config and state: not reachable from here
requests, replies = channel
MISSING = object()
DECIDERS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__hash__", "__contains__"}
BASES = [(int, int.__int__), (float, float.__float__), (complex, complex.__complex__), (str, str.__str__),
         (bytes, bytes.__bytes__), (list, lambda value: list(list.__iter__(value))),
         (tuple, lambda value: tuple(tuple.__iter__(value))), (set, lambda value: set(set.__iter__(value))),
         (frozenset, lambda value: frozenset(frozenset.__iter__(value))), (dict, lambda value: dict(dict.items(value)))]
OPS = {"call": lambda value, *args, **kwargs: value(*args, **kwargs), "getattr": getattr, "len": len, "next": next,
       "getitem": operator.getitem, "str": str, "float": float, "int": int, "index": operator.index, "complex": complex,
       "abs": abs, "neg": operator.neg, "pos": operator.pos}
for op in ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
    OPS[op] = getattr(operator, op)
    OPS["r" + op] = lambda value, other, function=OPS[op]: function(other, value)
handles, suspects = [], []


def isolate():
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # 1 was the judge's report file
        os.dup2(null, fd)
    low, high = sorted(channel)
    os.closerange(3, low)  # and everything else the judge had open
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 16)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: capabilities dropped below cannot come back by exec
    libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)())  # root in a user namespace: none left
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: it dies with the judge, with or without a PID namespace
    if os.getppid() != judge_pid:
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))


def install_guard(root):
    realpath, fsdecode = os.path.realpath, os.fsdecode
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    DENY = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
            "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
            "os.kill", "os.killpg", "signal.pthread_kill", "sys.addaudithook",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents"}  # gc would reach the snapshots below
    PATHS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
             "os.truncate": 1, "os.link": 2, "os.symlink": 2, "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1,
             "shutil.rmtree": 1, "os.chflags": 1}

    def inside(path):
        if isinstance(path, int):
            return True
        resolved = realpath(fsdecode(path))
        return resolved == root or resolved.startswith(root + "/")

    def hook(event, args):
        if event in DENY or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and (args[2] or 0) & WRITE and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        if event in PATHS and not all(inside(path) for path in args[:PATHS[event]]):
            raise PermissionError(f"sandbox: {event} outside the working directory")
    sys.addaudithook(hook)


def changes():
    """What the program changed of what the tests' own expressions rely on. No builtins are used here:
    the program may have replaced them."""
    found = [] if sys.modules is modules else ["the program replaced sys.modules"]
    if module.__dict__.get("__builtins__") is not builtins:
        found.append("the program replaced its __builtins__")
    for name, (watched_module, attributes) in snapshot.items():
        if modules.get(name) is not watched_module:
            found.append(f"the program replaced sys.modules[{name!r}]")
        current = watched_module.__dict__
        found += [f"the program changed {name}.{key}" for key, old in attributes.items()
                  if current.get(key, MISSING) is not old]
    return found


def failure(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:
        return "an exception that cannot be printed"


def decides(kind):
    """Whether the program's own code defines how values of `kind` compare or test true."""
    try:
        return any(vars(base).get("__module__") == "candidate" and not DECIDERS.isdisjoint(vars(base))
                   for base in kind.__mro__)
    except BaseException:
        return True


def as_plain(value, depth):
    """A subclass of a plain type (a namedtuple, an IntEnum, a Counter) travels as its base value."""
    kind = type(value)
    for base, as_base in BASES:
        if issubclass(kind, base):
            if decides(kind):
                suspects.append(f"the program returned a subclass of {base.__name__} with its own comparison")
            return encode(as_base(value), as_plain, depth + 1)
    raise NotPlain(kind)


def answer(value):
    try:
        return ["value", encode(value, as_plain)]
    except (NotPlain, RecursionError, ValueError, TypeError, MemoryError) as exc:
        culprit = exc.args[0] if isinstance(exc, NotPlain) and isinstance(exc.args[0], type) else type(value)
    handles.append(value)
    try:
        return ["object", str(culprit.__qualname__), decides(culprit), len(handles) - 1, callable(value)]
    except BaseException:
        return ["object", "value", True, len(handles) - 1, callable(value)]


def describe(request):
    described, pristine = {}, snapshot["builtins"][1]
    for name in request["names"]:
        value = namespace.get(name, MISSING)
        # `sorted = sorted` binds the builtin itself: the judge uses its own
        described[name] = ["absent"] if value is MISSING or value is pristine.get(name, MISSING) else answer(value)
    return described


def apply(request):
    try:
        value = handles[request["handle"]]
        args, kwargs = decode(request["args"], handles), decode(request["kwargs"], handles)
        if request["op"] == "iter":
            return ["items", [answer(item) for item in value]]
        result = OPS[request["op"]](value, *args, **kwargs)
    except BaseException as exc:
        return ["raised", failure(exc)]
    return answer(result)


def run(code):
    try:
        exec(code, namespace)
        return ["ok"]
    except BaseException as exc:
        return ["raised", failure(exc)]


try:
    isolate()
    del libc
    if guard:
        install_guard(os.path.realpath(os.getcwd()))
    module = types.ModuleType("candidate")
    module.__builtins__ = builtins
    namespace = vars(module)
    sys.modules["__main__"] = module
    modules = sys.modules
    snapshot = {name: (modules[name], dict(vars(modules[name]))) for name in ["builtins", *watched] if name in modules}
except BaseException as exc:
    send(replies, {"error": f"sandbox: the candidate's process could not start: {failure(exc)}"})
    os._exit(1)
try:  # before any of the program's code runs: this answer can be trusted
    code = compile(source, "candidate.py", "exec")
    send(replies, {"syntax": True})
except BaseException as exc:
    send(replies, {"syntax": False})
    os._exit(0)
loaded = run(code)
send(replies, {"loaded": "" if loaded == ["ok"] else loaded[1]})
HANDLERS = {"names": describe, "apply": apply, "exec": lambda request: run(request["test"])}
while True:
    try:
        request = receive(requests)
    except EOFError:
        os._exit(0)
    result = HANDLERS[request["kind"]](request)
    send(replies, {"id": request["id"], "result": result, "notes": changes() + suspects})
    del suspects[:]
'''


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
    config = {"source": source, "tests": tests, "guard": guard, "preimport": PREIMPORT, "candidate": CANDIDATE,
              "readonly": bool(namespace_command()),
              "drop_to": NOBODY if root else None,
              "limits": {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout_seconds) + 1,
                         "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}}
    command = [*namespace_command(), sys.executable, "-I", "-S", "-B", "-c", JUDGE]
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
