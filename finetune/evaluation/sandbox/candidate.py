"""The candidate: forked from the judge, which runs this file (codec.py ahead of it) with exec, its globals
holding `channel` (its ends of the two pipes), `libc`, `source` (the program), `guard`, `judge_pid` and
`watched` (the standard library modules the tests use). It drops what it inherited, runs the program, and
answers the judge's requests. Nothing it answers is trusted: it can only ever be a value the program produced.
Imported (by a test), it only defines its helpers."""
import builtins, ctypes, operator, os, resource, sys, types

if __name__ == "__main__":  # in the forked process
    sys.modules["__main__"].__dict__.clear()  # the judge's config and state: not reachable from here
else:  # imported: the codec that runs ahead of this file
    from finetune.evaluation.sandbox.codec import NotPlain, decode, encode, receive, send

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


if __name__ == "__main__":  # run the program, then answer the judge until it hangs up
    requests, replies = channel
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
        snapshot = {name: (modules[name], dict(vars(modules[name])))
                    for name in ["builtins", *watched] if name in modules}
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
