"""The judge: the first process in the namespaces, run as `python -I -S -B -c` with codec.py ahead of this file
and its config on stdin (sandbox.run_tests). It sets up the OS layer, forks the candidate, and then evaluates
every test itself; it never runs the program's code. Its state lives in module globals, never in a function's
frame, because the candidate clears this module's globals before anything of the program runs. Imported (by a
test), it only defines its helpers."""
import ast, builtins, ctypes, json, os, resource, sys

if __name__ != "__main__":  # imported: the codec that runs ahead of this file
    from finetune.evaluation.sandbox.codec import NotPlain, decode, encode, receive, send


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


def remount_read_only(libc):
    """Everything read-only but the working directory (the judge is root in its mount namespace)."""
    KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    here = os.getcwd()
    if libc.mount(here.encode(), here.encode(), None, 4096, None) != 0:  # MS_BIND: the workdir stays writable
        report("isolation", False, "bind mount of the working directory failed: errno %d" % ctypes.get_errno())
        return
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


if __name__ == "__main__":  # the judge's process; the candidate forked here clears these globals first
    config = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    asserts = [assertion(test) for test in config["tests"]]
    modules_used = [module_names(node) if node else set() for node in asserts]
    for name in config["preimport"] + sorted(set().union(*modules_used)):
        try:
            __import__(name)
        except ImportError:
            pass
    libc = ctypes.CDLL(None, use_errno=True)
    if config["readonly"]:
        remount_read_only(libc)
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
    if candidate_pid == 0:  # candidate.py clears this module's globals first, and never returns
        os.close(requests[1])
        os.close(replies[0])
        exec(config["candidate"], {"__name__": "__main__", "__builtins__": builtins, "libc": libc,
                                   "channel": (requests[0], replies[1]), "source": config["source"],
                                   "guard": config["guard"], "judge_pid": judge_pid,
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


if __name__ == "__main__":  # judge every test, in order
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
