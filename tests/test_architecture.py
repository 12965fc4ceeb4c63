"""The code's shape, checked: no import cycles, no stage importing another stage, short functions, rule files that
share names only through common.smk, tests that share fixtures only through conftest.py."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

from ssl4sci.code_graph import PACKAGE_DIR, imported_modules
from ssl4sci.registry.stages import stage_modules

MAX_FUNCTION_LINES = 80


def package_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        modules.append(".".join(("ssl4sci", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return modules


def import_graph() -> dict[str, set[str]]:
    return {module: imported_modules(module) - {module} for module in package_modules()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> b -> ... -> a, or None (depth-first search, imports anywhere in a file)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    assert find_cycle(import_graph()) is None


def test_no_stage_module_imports_another_stage_module():
    stages = {f"ssl4sci.{m}" for m in stage_modules()}
    assert {"ssl4sci.prepare", "ssl4sci.prepare_photos", "ssl4sci.sources.hub", "ssl4sci.report"} <= stages
    graph = import_graph()
    crossings = sorted(f"{stage} imports {other}" for stage in stages for other in graph[stage] & stages)
    assert crossings == []


def long_functions(root: Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_functions(PACKAGE_DIR, MAX_FUNCTION_LINES) == []


CONSTANT = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\b[A-Z]{4,}\b")
DEFINITION = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=", re.MULTILINE)


def test_rule_files_share_names_only_through_common_smk():
    """A name a rule file uses is defined in that file or in common.smk, so the include order of the others does
    not matter."""
    rules = REPO / "workflow" / "rules"
    defined = {path.name: set(DEFINITION.findall(path.read_text())) for path in rules.glob("*.smk")}
    shared = defined["common.smk"]
    borrowed = []
    for path in sorted(rules.glob("*.smk")):
        if path.name == "common.smk":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        used = set(CONSTANT.findall(code))
        for other, names in defined.items():
            if other not in (path.name, "common.smk"):
                own = names - shared - defined[path.name]
                borrowed += [f"{path.name} uses {name} from {other}" for name in sorted(own & used)]
    assert borrowed == []


def test_tests_share_fixtures_through_conftest_not_by_importing_each_other():
    tests = REPO / "tests"
    names = {path.stem for path in tests.rglob("test_*.py")}
    imports = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.relative_to(tests)} imports {m}" for m in modules if m.split(".")[-1] in names]
    assert imports == []
