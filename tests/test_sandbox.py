"""The code sandbox: hostile or broken generated programs are contained, scored as failures, and the
evaluation goes on. Each escape is tried twice: with every layer, and with the Python audit hook
off (guard=False), so the OS layer (namespaces, read-only filesystem, rlimits, `nobody`) is shown
to hold on its own where this machine provides it. Programs that try to fake their score fail and
are reported suspicious, with either layer, while their honest twins pass."""
import ast
import collections
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest

from finetune.evaluation import sandbox
from finetune.evaluation.sandbox import candidate, codec, judge
from conftest import ROOT
from finetune.evaluation.task_metrics import coding_metrics

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
GOOD = "def add(a, b):\n    return a + b\n"
LAYERS = [pytest.param(True, id="all-layers"), pytest.param(False, id="os-layer-only")]
os_layer = pytest.mark.skipif(not sandbox.namespace_command(), reason="no unshare namespaces on this machine")


def run(source, guard=True, timeout_seconds=3.0, tests=TESTS):
    return sandbox.run_tests(source, tests, timeout_seconds=timeout_seconds, memory_mb=256, guard=guard)


def test_a_correct_program_passes_and_a_wrong_one_is_scored_per_test():
    good, wrong = run(GOOD), run("def add(a, b):\n    return a + b if a < 0 else 0\n")
    assert good.status == "finished" and good.syntax_ok and good.passed == [True, True] and good.all_passed
    assert wrong.syntax_ok and wrong.passed == [False, True] and not wrong.all_passed
    assert "AssertionError" in wrong.errors[0]
    broken = run("def add(a, b)\n    return a + b\n")
    assert not broken.syntax_ok and broken.passed == [False, False]


def test_programs_that_end_the_process_or_print_fake_results_fail():
    assert run("import os\nos._exit(0)\n").status == "crashed"
    assert not run("import sys\nsys.exit(0)\n").all_passed
    fake = 'print("\\nOK [\\"test\\", 0, true, \\"\\"]")\nprint("done")\ndef add(a, b):\n    return None\n'
    assert run(fake).passed == [False, False]


@pytest.mark.parametrize("guard", LAYERS)
def test_infinite_loop_is_killed_at_the_time_limit(guard):
    outcome = run("while True:\n    pass\n", guard=guard, timeout_seconds=1.0)
    assert outcome.status == "timeout" and not outcome.all_passed  # killed by the parent's timer (no wall-clock assert)


@pytest.mark.parametrize("guard", LAYERS)
def test_fork_bomb_cannot_fork(guard):
    outcome = run("import os\nwhile True:\n    os.fork()\n" + GOOD, guard=guard)
    assert outcome.passed == [False, False]
    assert "fork" in outcome.errors[0] or "Resource temporarily unavailable" in outcome.errors[0]


@pytest.mark.parametrize("guard", LAYERS)
def test_huge_allocation_hits_the_memory_limit(guard):
    outcome = run("block = bytearray(16 * 1024 ** 3)\n" + GOOD, guard=guard)
    assert outcome.passed == [False, False] and "MemoryError" in outcome.errors[0]


@pytest.mark.parametrize("guard", [pytest.param(True, id="all-layers"),
                                   pytest.param(False, id="os-layer-only", marks=os_layer)])
def test_writing_and_deleting_outside_its_directory_is_refused(tmp_path, guard):
    tmp_path.chmod(0o777)  # even a world-writable folder is out of reach
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    target = tmp_path / "written.txt"
    for source in (f"open({str(target)!r}, 'w').write('x')\n", f"import os\nos.remove({str(victim)!r})\n",
                   f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n", f"import os\nos.rename({str(victim)!r}, 'here')\n"):
        outcome = run(source + GOOD, guard=guard)
        assert outcome.passed == [False, False], source
    assert victim.read_text() == "keep me" and not target.exists()
    inside = run("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n" + GOOD, guard=guard)
    assert inside.all_passed  # its own throwaway directory is writable


@pytest.mark.parametrize("guard", [pytest.param(True, id="all-layers"),
                                   pytest.param(False, id="os-layer-only", marks=os_layer)])
def test_network_connections_are_refused(guard):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        outcome = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + GOOD, guard=guard)
        assert outcome.passed == [False, False]
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the listener


def test_the_evaluation_survives_a_batch_of_hostile_programs():
    hostile = ["while True:\n    pass\n", "import os\nwhile True:\n    os.fork()\n", "x = bytearray(1 << 40)\n",
               "import os\nos.kill(os.getppid(), 9)\n", "import os\nos.killpg(0, 9)\n"]
    outcomes = [[run(source, timeout_seconds=1.0)] for source in hostile] + [[run(GOOD), run("syntax error(")]]
    metrics = coding_metrics(outcomes, [1])
    assert metrics["pass@1"] == pytest.approx(0.5 / 6)  # only the good program of the last problem passes
    assert metrics["syntax_valid_rate"] == pytest.approx(6 / 7)
    assert metrics["test_pass_rate"] == pytest.approx(2 / 14) and metrics["timeouts"] == 1
    assert metrics["suspicious"] == 0 and metrics["unverified_tests"] == 0  # hostile, but not faking a score


# --------------------------------------------------------------------------- scores the program cannot fake
EQUAL = ("class Equal:\n    def __eq__(self, other):\n        return True\n"
         "    def __ne__(self, other):\n        return False\n")
UNIQUE = ["assert sorted(unique([3, 1, 3, 2])) == [1, 2, 3]"]
UNIQUE_HONEST = "def unique(items):\n    return list(set(items))\n"
AREA = ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"]
AREA_HONEST = "import math\ndef area(r):\n    return math.pi * r * r\n"
WRONG_ADD = "def add(a, b):\n    return None\n"
FORGE = ("import json, os\nfor fd in range(64):\n    for line in (json.dumps(['test', 0, True, '', True]), "
         "'0' * 32 + ' ' + json.dumps(['test', 0, True, ''])):\n        try:\n"
         "            os.write(fd, ('\\n' + line + '\\n').encode())\n        except OSError:\n            pass\n")
ANSWER_AHEAD = ("import json, os\nframe = json.dumps({'id': 1, 'result': ['value', 3], 'notes': []}).encode()\n"
                "for fd in range(3, 64):\n    try:\n        os.write(fd, len(frame).to_bytes(4, 'big') + frame)\n"
                "    except OSError:\n        pass\n")
# name: (the cheat, its honest twin, the tests)
CHEATS = {
    "a value equal to anything": (EQUAL + "def add(a, b):\n    return Equal()\n", GOOD, TESTS),
    "an int subclass equal to anything": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n", GOOD, TESTS),
    "a str subclass equal to anything": (
        "class Str(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
        "def twice(s):\n    return Str('')\n", "def twice(s):\n    return s * 2\n", ["assert twice('ab') == 'abab'"]),
    "a list of values equal to anything": (EQUAL + "def first_2(items):\n    return [Equal(), Equal()]\n",
                                           "def first_2(items):\n    return items[:2]\n",
                                           ["assert first_2([5, 6, 7]) == [5, 6]"]),
    "a value that is always true": ("class Yes:\n    def __bool__(self):\n        return True\n"
                                    "def is_even(n):\n    return Yes()\n",
                                    "def is_even(n):\n    return n % 2 == 0\n", ["assert is_even(2)", "assert is_even(10)"]),
    "a patched builtin": ("import builtins\nbuiltins.sorted = lambda items, **options: [1, 2, 3]\n"
                          "def unique(items):\n    return items\n", UNIQUE_HONEST, UNIQUE),
    "a redefined builtin": ("def sorted(items, **options):\n    return [1, 2, 3]\ndef unique(items):\n    return items\n",
                            UNIQUE_HONEST, UNIQUE),
    "a patched standard library function": ("import math\nmath.isclose = lambda *args, **options: True\n"
                                            "def area(r):\n    return 0\n", AREA_HONEST, AREA),
    "a swapped sys.modules entry": ("import sys, types\nmath = types.ModuleType('math')\n"
                                    "math.isclose = lambda *args, **options: True\nsys.modules['math'] = math\n"
                                    "def area(r):\n    return 0\n", AREA_HONEST, AREA),
    "report lines forged on every fd": (FORGE + WRONG_ADD, GOOD, TESTS),
    "answers written ahead on its pipe": (ANSWER_AHEAD + WRONG_ADD, GOOD, TESTS),
}


@pytest.fixture(scope="module", params=LAYERS)
def cheats(request):
    return {name: (run(cheat, guard=request.param, tests=tests), run(honest, guard=request.param, tests=tests))
            for name, (cheat, honest, tests) in CHEATS.items()}


@pytest.mark.parametrize("name", CHEATS)
def test_a_cheat_fails_and_is_suspicious_while_its_honest_twin_passes(cheats, name):
    cheat, honest = cheats[name]
    assert cheat.status == "finished" and not any(cheat.passed) and not cheat.all_passed, cheat
    assert cheat.suspicious, cheat
    assert honest.all_passed and all(honest.verified) and not honest.suspicious, honest


def test_cheats_count_as_suspicious_in_the_metrics(cheats):
    metrics = coding_metrics([list(pair) for pair in cheats.values()], [1, 2])
    assert metrics["pass@1"] == 0.5 and metrics["pass@2"] == 1.0
    assert metrics["suspicious"] == len(CHEATS) and metrics["unverified_tests"] == 0


def test_the_program_reaches_nothing_of_the_judge():
    probe = ("import json, os, sys\nimport __main__\nframe, names = sys._getframe(), set()\nwhile frame is not None:\n"
             "    names |= set(frame.f_globals) | set(frame.f_locals)\n    frame = frame.f_back\n"
             "targets = []\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
             "        targets.append(os.readlink('/proc/self/fd/' + fd).split(':')[0])\n    except OSError:\n        pass\n"
             "def reachable_names():\n    return sorted(names)\ndef open_files():\n    return sorted(targets)\n"
             "def main_is_mine():\n    return __main__.__name__ == 'candidate'\n")
    outcome = run(probe, tests=["assert not {'config', 'nonce', 'report', 'out', 'results'} & set(reachable_names())",
                                "assert open_files() == ['/dev/null'] * 3 + ['pipe'] * 2", "assert main_is_mine()"])
    assert outcome.all_passed, outcome


def test_rewriting_its_own_harness_only_changes_the_values_it_answers_with():
    """The candidate's side of the pipe is the program's to rewrite (its frames reach it): here every
    result turns into an object equal to anything that claims not to define comparisons, and any test
    run inside the candidate passes. The judge still never asks for a verdict, so both tests fail."""
    liar = (EQUAL + "import sys\nframe = sys._getframe()\nwhile 'answer' not in frame.f_globals:\n"
            "    frame = frame.f_back\nscope = frame.f_globals\n"
            "def lie(value, handles=scope['handles']):\n    handles.append(value if callable(value) else Equal())\n"
            "    return ['object', 'int', False, len(handles) - 1, callable(value)]\n"
            "scope['answer'], scope['run'] = lie, lambda code: ['ok']\n" + WRONG_ADD)
    outcome = run(liar)
    assert outcome.status == "finished" and outcome.passed == [False, False] and "not plain data" in outcome.errors[0]


def test_objects_of_the_program_are_judged_by_their_values_and_comparisons_of_two_are_unverified():
    stack = ("from dataclasses import dataclass\n@dataclass\nclass Point:\n    x: int\n"
             "class Stack:\n    def __init__(self):\n        self.items = []\n"
             "    def push(self, item):\n        self.items.append(item)\n        return self\n"
             "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n")
    tests = ["assert Stack().push(1).push(2).items == [1, 2]", "assert list(evens(5)) == [0, 2, 4]",
             "assert Point(1) == Point(1)", "assert Point(1).x == 1; assert Point(2).x == 2"]
    outcome = run(stack, tests=tests)
    assert outcome.all_passed and outcome.verified == [True, True, False, False], outcome
    assert coding_metrics([[outcome]], [1])["unverified_tests"] == 2


def test_the_coding_example_programs_pass_verified_and_their_broken_versions_fail():
    rows = [json.loads(line) for line in (ROOT / "examples" / "coding" / "data.jsonl").read_text().splitlines()][:6]
    for row in rows:
        tests = [line.strip() for line in row["instruction"].splitlines() if line.startswith("assert")]
        good, broken = run(row["output"], tests=tests), run(re.sub(r"return .*", "return None", row["output"]), tests=tests)
        assert good.all_passed and all(good.verified) and not good.suspicious, (row["output"], good)
        assert not any(broken.passed) and not broken.suspicious, (row["output"], broken)


# --------------------------------------------------------------------------- the program files on their own
PLAIN = [None, True, False, 0, -7, (1 << 62) - 1, -(1 << 62) + 1, 1.5, -0.0, float("inf"), "", "héllo\n\x00", b"",
         b"\x00\xff", 2 - 3j, [], (), set(), frozenset(), {}, [1, True, 2.5, "a"], (1, (2, (3,))), {3, "x"},
         frozenset({1.5, b"y"}), {1: "one", (2, 3): [4], None: {"nested": {5}}, b"k": 2j},
         [1 << 62, -(1 << 62), 10 ** 5000, -(10 ** 5000)], 10 ** 5000]


def through_the_pipe(value):
    """encode, the json that crosses the pipe, decode."""
    return codec.decode(json.loads(json.dumps(codec.encode(value))))


def same(a, b):
    """Equal and of exactly the same types, all the way down."""
    if type(a) is not type(b):
        return False
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    return a == b


@pytest.mark.parametrize("value", PLAIN, ids=lambda value: type(value).__name__)
def test_codec_round_trips_plain_data_by_exact_type(value):
    assert same(through_the_pipe(value), value), value


def test_codec_sends_big_ints_as_hex_and_small_ones_as_they_are():
    assert codec.encode((1 << 62) - 1) == (1 << 62) - 1 and codec.encode(1 << 62) == ["I", "4000000000000000"]
    assert codec.encode(-(1 << 62)) == ["I", "-4000000000000000"]
    assert codec.encode([1, 2, 1 << 70]) == ["L", 1, 2, ["I", format(1 << 70, "x")]]  # no fast path past the bound


def test_codec_refuses_what_is_not_plain_data():
    class Int(int):
        pass

    for value in (object(), Int(3), [1, Int(3)], {"key": print}, range(3), bytearray(b"x")):
        with pytest.raises(codec.NotPlain):
            codec.encode(value)
    with pytest.raises(codec.NotPlain) as refused:
        codec.encode(Int(3))
    assert refused.value.args[0] is Int  # the type, for the candidate's answer
    assert codec.encode([Int(3)], lambda value, depth: ["int", int(value)]) == ["L", ["int", 3]]


def test_codec_limits_nesting_both_ways():
    def nested(depth):
        value = []
        for _ in range(depth):
            value = [value]
        return value

    assert through_the_pipe(nested(100)) == nested(100)
    with pytest.raises(codec.NotPlain, match="nested over 100 deep"):
        codec.encode(nested(101))
    deep = ["L"]
    for _ in range(200):
        deep = ["L", deep]
    with pytest.raises(ValueError):
        codec.decode(deep)


@pytest.mark.parametrize("data", [[], ["X", 1], ["D", 1], ["I", 5], ["B", "zz"], ["C", 1, 2], {"a": 1}, [1, 2],
                                  ["H", 0], ["H", -1]])
def test_codec_decodes_strictly(data):
    with pytest.raises(ValueError):
        codec.decode(data)


def test_codec_handles_refer_to_the_candidates_objects_only_where_it_keeps_them():
    handles = [print, len]
    assert codec.decode(["L", ["H", 1], ["H", 0]], handles) == [len, print]
    with pytest.raises(ValueError):
        codec.decode(["H", 1])


def test_codec_frames_cross_a_pipe_whole_and_bounded():
    read, write = os.pipe()
    try:
        codec.send(write, {"id": 1, "result": ["value", codec.encode([1, "two", b"3"])]})
        message = codec.receive(read)
        assert message["id"] == 1 and codec.decode(message["result"][1]) == [1, "two", b"3"]
        codec.send(write, "x" * 100)
        with pytest.raises(ValueError, match="oversized"):
            codec.receive(read, limit=50)
    finally:
        os.close(write)
        os.close(read)
    read, write = os.pipe()
    os.write(write, (10).to_bytes(4, "big") + b"[1,")  # the writer ended mid-frame
    os.close(write)
    with pytest.raises(EOFError):
        codec.receive(read)
    os.close(read)


def test_importing_the_program_files_runs_nothing():
    assert vars(sys.modules["__main__"])  # the candidate clears __main__ only when it runs
    assert not hasattr(judge, "config") and not hasattr(candidate, "requests")
    for name in ("judge.py", "candidate.py"):
        text = sandbox.program(name)
        assert text.startswith((Path(sandbox.__file__).parent / "codec.py").read_text())
        compile(text, name, "exec")


@pytest.mark.parametrize("test, judged", [("assert add(1, 2) == 3", True), ("assert x", True),
                                          ("assert add(1, 2) == 3, 'message'", True), ("x = 1", False),
                                          ("assert a; assert b", False), ("assert (", False), ("assert \0", False),
                                          ("add(1, 2)", False), ("", False)])
def test_judge_evaluates_a_test_itself_only_when_it_is_one_assert(test, judged):
    node = judge.assertion(test)
    assert (node is not None) == judged and (node is None or isinstance(node, ast.Assert))


@pytest.mark.parametrize("test, modules", [("assert math.isclose(area(1), 3.14)", {"math"}),
                                           ("assert re.match('a', f()) and string.digits", {"re", "string"}),
                                           ("assert sorted(f()) == [1]", set()),
                                           ("assert point.x == 1", set()),  # not a standard library module
                                           ("assert copy.copy(f()) == copy(2)", set())])  # the program's `copy`
def test_judge_binds_its_own_standard_library_modules(test, modules):
    assert judge.module_names(judge.assertion(test)) == modules


def test_judge_binds_the_candidates_answers_to_values_errors_and_stand_ins():
    assert judge.bind("f()", ["value", ["L", 1, ["I", "ff"]]]) == [1, 255]
    assert judge.bind("f()", ["items", [["value", 1], ["value", "a"]]]) == [1, "a"]
    with pytest.raises(TypeError, match="unhashable"):  # raised as itself, for Python's own fallbacks
        judge.bind("f()", ["raised", "TypeError: unhashable"])
    with pytest.raises(judge.Raised, match="ZeroDivisionError: division by zero"):
        judge.bind("f()", ["raised", "ZeroDivisionError: division by zero"])
    for malformed in (["value"], ["value", ["X"]], ["object", "T", 1, 2, 3], ["verdict", True], "yes", None):
        with pytest.raises(judge.Broken):
            judge.bind("f()", malformed)


def test_judge_never_asks_a_program_object_for_a_verdict():
    point = judge.bind("Point(1)", ["object", "Point", False, 0, False])
    assert type(point) is judge.Remote and repr(point) == "<Point of the program>"
    for verdict in (lambda: point == 1, lambda: point != (1,), lambda: point < 2, lambda: bool(point)):
        with pytest.raises(judge.NotPlain, match="Point object, not plain data"):
            verdict()
    with pytest.raises(judge.Unverifiable):
        point == range(3)  # an object of the test's own: the candidate runs that test
    with pytest.raises(judge.Unverifiable):
        hash(point)
    with pytest.raises(TypeError, match="not callable"):
        point()


def test_judge_reads_what_the_candidate_ran():
    assert judge.ran(["ok"]) == "" and judge.ran(["raised", "NameError: x"]) == "NameError: x"
    for malformed in (["raised"], ["raised", 1], ["fine"], True):
        with pytest.raises(judge.Broken):
            judge.ran(malformed)


def test_candidate_answers_with_plain_values_or_handles():
    Pair = collections.namedtuple("Pair", "a b")
    assert candidate.answer(Pair(1, [2])) == ["value", ["T", 1, ["L", 2]]]  # a subclass travels as its base value
    assert candidate.answer(collections.Counter("aab")) == ["value", ["D", "a", 2, "b", 1]]
    kind, name, decides, handle, callable_ = candidate.answer(len)
    assert (kind, name, decides, callable_) == ("object", "builtin_function_or_method", False, True)
    assert candidate.handles[handle] is len
    assert candidate.apply({"handle": handle, "op": "call", "args": ["L", "abc"], "kwargs": ["D"]}) == ["value", 3]
    assert candidate.apply({"handle": handle, "op": "call", "args": ["L", 1], "kwargs": ["D"]})[0] == "raised"


def test_candidate_flags_classes_of_the_program_that_decide_comparisons():
    class Always(int):
        __module__ = "candidate"  # defined by the program

        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Plain:
        __module__ = "candidate"

    assert candidate.decides(Always) and not candidate.decides(Plain) and not candidate.decides(int)
    try:
        assert candidate.answer(Always(3)) == ["value", 3]
        assert candidate.suspects == ["the program returned a subclass of int with its own comparison"]
    finally:
        del candidate.suspects[:]
    kind, name, decides, _, _ = candidate.answer(Plain())
    assert kind == "object" and name.endswith("Plain") and decides is False
    assert candidate.failure(ValueError("x" * 500)) == ("ValueError: " + "x" * 500)[:300]
