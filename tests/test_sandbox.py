"""The code sandbox: hostile or broken generated programs are contained, scored as failures, and the
evaluation goes on. Each escape is tried twice: with every layer, and with the Python audit hook
off (guard=False), so the OS layer (namespaces, read-only filesystem, rlimits, `nobody`) is shown
to hold on its own where this machine provides it."""
import socket
import time

import pytest

import sandbox
from task_metrics import coding_metrics

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
    started = time.monotonic()
    outcome = run("while True:\n    pass\n", guard=guard, timeout_seconds=1.0)
    assert outcome.status == "timeout" and not outcome.all_passed
    assert time.monotonic() - started < 5


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
