"""The package layout (docs/design.md): imports point down, no cycles, small faces, no private names shared.

The graph counts every import statement of the project's own modules, function-level ones included (a cycle
dodged by a function-level import is still a cycle). An edge goes to the module named (``from sim.x import
y`` -> sim.x; ``from sim import checkpoint`` -> sim.checkpoint when that is a module); the implicit import of
a parent package by its children is not an edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compressors", "sim", "theory")
#: Function-level imports of project modules allowed, each where import time matters (none today).
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}
MAX_FUNCTION_LEVEL = 10
MAX_SIM_TOP_LEVEL_FILES = 14


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


MODULES = {module_name(p)[0]: p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


class Import:
    def __init__(self, source: str, target: str, names: list[str], function_level: bool, line: int):
        self.source, self.target, self.names, self.function_level, self.line = source, target, names, function_level, line

    def __repr__(self) -> str:
        where = "function-level " if self.function_level else ""
        return f"{self.source}:{self.line} {where}-> {self.target} {self.names}"


def project_imports() -> list[Import]:
    found = []
    for name, path in MODULES.items():
        _, is_package = module_name(path)
        tree = ast.parse(path.read_text())
        inside_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside_function.update(id(child) for child in ast.walk(node) if child is not node)
        for node in ast.walk(tree):
            function_level = id(node) in inside_function
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        found.append(Import(name, alias.name, [], function_level, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] not in PACKAGES:
                    continue
                names = [alias.name for alias in node.names]
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                for sub in submodules:
                    found.append(Import(name, sub, [], function_level, node.lineno))
                rest = [n for n in names if f"{target}.{n}" not in MODULES]
                if rest or not submodules:
                    found.append(Import(name, target, rest, function_level, node.lineno))
    return found


IMPORTS = project_imports()


def test_compressors_import_nothing_from_sim():
    upward = [i for i in IMPORTS if i.source.split(".")[0] in ("compressors", "theory") and i.target.startswith("sim")]
    assert upward == []
    theory_up = [i for i in IMPORTS if i.source.startswith("theory") and not i.target.startswith("theory")]
    assert theory_up == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges.get(child, ())))))
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_counting_function_level_imports():
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    assert find_cycle(edges) is None


def test_function_level_imports_are_few_and_named():
    inner = [i for i in IMPORTS if i.function_level]
    assert len(inner) <= MAX_FUNCTION_LEVEL
    assert [i for i in inner if (i.source, i.target) not in FUNCTION_LEVEL_ALLOWED] == []


def test_no_private_name_is_imported_from_another_module():
    shared = [i for i in IMPORTS if any(n.startswith("_") and not n.startswith("__") for n in i.names)]
    assert shared == []


def test_sim_keeps_its_wings():
    top = sorted(p.name for p in (ROOT / "sim").glob("*.py"))
    assert len(top) <= MAX_SIM_TOP_LEVEL_FILES, top
    for wing in ("real", "workflow", "cli", "cost", "tasks", "models", "analysis"):
        assert (ROOT / "sim" / wing / "__init__.py").is_file()
    for wing in ("comm", "ddp", "ranks"):
        assert (ROOT / "compressors" / wing / "__init__.py").is_file()


@pytest.mark.parametrize("face", sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                                        for p in (ROOT / package).rglob("__init__.py")))
def test_faces_list_their_public_names_plainly(face):
    text = (ROOT / face).read_text()
    assert "__all__ +=" not in text
    tree = ast.parse(text)
    declared = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert len(declared) <= 1
    if declared:  # every listed name is bound in the face
        listed = ast.literal_eval(declared[0].value)
        bound = {alias.asname or alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names}
        bound |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        bound |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        assert set(listed) <= bound, set(listed) - bound


def test_public_names_are_where_users_find_them():
    import compressors
    import compressors.testing
    import sim

    for name in ("run", "Experiment", "sweep", "compare", "whatif", "run_distributed", "load_results",
                 "tune_lr", "VirtualCollective", "checkpoint", "plot"):
        assert hasattr(sim, name), name
    for name in ("make", "register", "ddp_comm_hook", "PowerSGD", "Config", "optimizer_step", "REGISTRY",
                 "match_bits"):
        assert hasattr(compressors, name), name
    assert callable(compressors.testing.check_compressor)
    assert callable(sim.plot.plot_metric) and callable(sim.checkpoint.latest)


#: The wings from top to bottom (docs/design.md); a module may import its own wing or any wing below it.
WINGS = ["sim.cli", "sim.real", "sim.analysis", "sim.workflow", "sim", "sim.cost", "sim.tasks", "sim.models",
         "compressors", "compressors.comm", "theory"]
SAME_LEVEL = {"sim.cost": 5, "sim.tasks": 5, "sim.models": 5}  # side by side: tasks build models, cost builds both


def wing_of(module: str) -> str:
    parts = module.split(".")
    for size in (2, 1):
        head = ".".join(parts[:size])
        if head in WINGS and (size == 1 or len(parts) > 1):
            if head == "sim" and module in ("sim", "sim.__main__", "sim.launch"):
                return "entry"
            return head
    return parts[0]


def test_imports_point_down_the_wings():
    level = {wing: SAME_LEVEL.get(wing, index) for index, wing in enumerate(WINGS)}
    level["entry"] = -1  # the package face and the two entry points may import anything
    upward = [i for i in IMPORTS if level[wing_of(i.target)] < level[wing_of(i.source)]]
    assert upward == []
