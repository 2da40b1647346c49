"""The house a newcomer reads: `ls stages/` is the pipeline, every library module sits in a folder named for its
concern, no module imports one that imports it back, no program hides in a string, and the README's code map
names every room."""
import ast
import re

import yaml

from conftest import ROOT

CONCERNS = {"params", "data", "training", "evaluation", "export", "runtime", "models"}
CODE = ["finetune", "stages", "scripts", "benchmarks", "examples", "data"]  # what runs; tests are checked apart
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def modules() -> dict[str, ast.Module]:
    """Dotted name -> parsed module, for the package and the stage scripts."""
    found = {}
    for path in sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[dotted] = ast.parse(path.read_text())
    return found


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


def test_the_stage_folder_lists_exactly_the_scripts_dvc_yaml_runs():
    run = {word.removeprefix("stages.") + ".py" for stage in STAGES.values() for word in stage["cmd"].split()
           if word.startswith("stages.")}
    listed = {path.name for path in (ROOT / "stages").iterdir() if path.name != "__pycache__"}
    assert listed == run


def test_every_library_module_sits_in_a_folder_named_for_its_concern():
    top = {path.name for path in (ROOT / "finetune").iterdir() if path.name != "__pycache__"}
    assert top == {"__init__.py"} | CONCERNS, sorted(top)
    for concern in CONCERNS:
        assert (ROOT / "finetune" / concern / "__init__.py").exists(), concern
        assert ast.get_docstring(ast.parse((ROOT / "finetune" / concern / "__init__.py").read_text())), concern


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, lazy ones included: a cycle is a component of more
    than one module, or a module importing itself."""
    trees = modules()
    graph = {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}
    for name in list(graph):  # importing a.b.c runs a/__init__ and a/b/__init__ first: only the leaf counts here
        graph[name] = {target for target in graph[name] if not any(other.startswith(target + ".") for other in graph[name])}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check above is not vacuous: the old trainer <-> memory_plan pair (both imports inside functions) is found."""
    a = ast.parse("def f():\n    from finetune.training import memory_plan\n")
    b = ast.parse("def g():\n    from finetune.training.trainer import pack\n")
    known = {"finetune.training.trainer", "finetune.training.memory_plan"}
    assert imported(a, known) == {"finetune.training.memory_plan"}
    assert imported(b, known) == {"finetune.training.trainer"}


def program_strings(path):
    """String constants (not docstrings) of several lines that parse as Python with statements in them."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and node.value.count("\n") >= 4:
            try:
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            if any(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.For, ast.While, ast.With))
                   for n in ast.walk(inner)):
                yield node.lineno, node.value.count("\n") + 1


def test_no_program_is_held_in_a_string():
    """A program another interpreter runs lives in its own .py file that linters, tests and readers see. Tests may
    hold the small generated programs they feed the sandbox (they are the data under test), nothing longer."""
    found = []
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{line} ({lines} lines)" for line, lines in program_strings(path)]
    for path in sorted((ROOT / "tests").glob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{line} ({lines} lines)" for line, lines in program_strings(path) if lines > 20]
    assert not found, "programs in strings: " + ", ".join(found)


def test_the_program_finder_sees_a_program():
    source = 'DRIVER = """\nimport sys\nfor arg in sys.argv:\n    print(arg)\nprint("done")\n"""\n'
    path = ROOT / "tests" / "__program_probe__.py"
    try:
        path.write_text(source)
        assert list(program_strings(path)) == [(1, 6)]
    finally:
        path.unlink()


def test_no_library_file_is_long():
    """STYLE.md: data stages well under ~250 lines, train under ~600; the sandbox's pieces each under 350."""
    long = [f"{path.relative_to(ROOT)} ({count})" for path in sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "stages").glob("*.py")])
            if (count := len(path.read_text().splitlines())) > 650]
    assert not long, long


def test_dvc_yaml_lists_deps_one_per_line_in_one_order():
    """The stage's script, then the library files it imports (sorted), then its data; one per line."""
    text = (ROOT / "dvc.yaml").read_text()
    assert "deps: [" not in text
    for name, stage in STAGES.items():
        deps = stage["deps"]
        code = [dep for dep in deps if dep.endswith(".py")]
        script = next(word for word in stage["cmd"].split() if word.startswith("stages.")).replace(".", "/") + ".py"
        assert code[0] == script and code[1:] == sorted(code[1:]), name
        assert deps[:len(code)] == code, f"{name}: code deps first, then data"


def code_map() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Code map"):]
    section = section[:section.index("\n## ", 5)]
    return {match[0]: match[1] for match in re.findall(r"^\| `([^`]+)` \| (.+?) \|$", section, flags=re.M)}


def test_the_readme_code_map_names_every_room_and_nothing_else():
    tracked = {path.name + "/" for path in ROOT.iterdir()
               if path.is_dir() and not path.name.startswith(".") and path.name not in ("models", "metrics")
               and any(path.rglob("*"))} - {"__pycache__/"}
    expected = ({f"stages/{path.name}" for path in (ROOT / "stages").glob("*.py")}
                | {f"finetune/{concern}/" for concern in CONCERNS}
                | (tracked - {"stages/", "finetune/"})
                | {"dvc.yaml", "params.yaml", "models/", "metrics/"})
    entries = code_map()
    assert set(entries) == expected, (sorted(set(entries) - expected), sorted(expected - set(entries)))
    assert all(len(text) < 160 for text in entries.values()), "one job per row: keep it short"


def params_reference() -> list[tuple[list[str], str]]:
    """README's params table as (full keys of a row, its `shipped` cell): `a.b.{x,y}` and `a.b.x`, `y` name
    siblings; a `a.*` or `a.<name>.{x,y}` row stands for many keys."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("| key | shipped | meaning |"):]
    rows = []
    for line in section.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        keys_cell, shipped = (cell.strip() for cell in line.split("|")[1:3])
        names = re.findall(r"`([^`]+)`", keys_cell)
        first = names[0]
        if "{" in first:
            parent, children = re.fullmatch(r"(.+)\.\{(.+)\}", first).groups()
            keys = [f"{parent}.{child}" for child in children.split(",")]
        else:
            parent = first.rpartition(".")[0]
            keys = [first] + [name if name.count(".") == first.count(".") else f"{parent}.{name}" for name in names[1:]]
        rows.append((keys, shipped))
    return rows


def split_values(cell: str) -> list[str]:
    """`1, [a, b], null` -> ['1', '[a, b]', 'null'] (commas inside brackets stay)."""
    values, depth, current = [], 0, ""
    for char in cell.replace("`", ""):
        depth += char in "[{" or -(char in "]}")
        if char == "," and not depth:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return values + [current.strip()]


def same_value(written: str, value) -> bool:
    parsed = yaml.safe_load(written)
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and isinstance(parsed, str)):
        try:
            return float(parsed) == float(value)
        except (TypeError, ValueError):
            return False
    return parsed == value


def test_the_readme_params_reference_names_real_keys_with_their_shipped_values():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def lookup(key):
        value = params
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return KeyError(key)
            value = value[part]
        return value

    rows, wrong = params_reference(), []
    assert len(rows) > 40
    for keys, shipped in rows:
        if any("*" in key or "<" in key for key in keys):
            continue  # a row for many keys
        values = [lookup(key) for key in keys]
        wrong += [f"{key}: not in params.yaml" for key, value in zip(keys, values) if isinstance(value, KeyError)]
        if not shipped or shipped.startswith("see ") or "…" in shipped or any(isinstance(v, (dict, KeyError)) for v in values):
            continue
        written = split_values(shipped)
        written = written * len(keys) if len(written) == 1 else written
        if len(written) != len(keys):
            wrong.append(f"{keys}: {len(keys)} keys, shipped {shipped!r}")
            continue
        wrong += [f"{key}: README {text!r}, params.yaml {value!r}" for key, text, value in zip(keys, written, values)
                  if not same_value(text, value)]
    # and every knob of params.yaml has its row (`a.*` and `<name>` rows cover many)
    patterns = [re.escape(key).replace(r"\*", ".+") for keys, _ in rows for key in keys]
    patterns = [re.sub(r"<[^>]+>", "[^.]+", pattern.replace(r"\<", "<").replace(r"\>", ">")) for pattern in patterns]

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]

    wrong += [f"{leaf}: no row in README's params reference" for leaf in leaves(params)
              if not any(re.fullmatch(pattern, leaf) for pattern in patterns)]
    assert not wrong, "\n".join(wrong)
