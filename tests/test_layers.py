"""The layers hold: manage.py → api/ → worker/ → models/, imports never run back up, no import cycles, and the
commands that must start fast (and the API layer as a whole) never load the ML stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = {"manage": 3, "api": 2, "worker": 1, "models": 0}
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate"}
LIBRARIES = {"sqlalchemy", "celery", "kombu", "redis"}


def project_files() -> list[Path]:
    return [REPO / "manage.py"] + sorted(p for layer in ("api", "worker", "models") for p in (REPO / layer).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, at module level or inside functions: (line, absolute dotted name)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            # `from worker.data import files` imports the submodule worker.data.files
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _line, target in imports_of(path):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def test_imports_run_down_the_layers_only():
    wrong = []
    for path in project_files():
        layer = path.relative_to(REPO).parts[0].removesuffix(".py")
        for line, target in imports_of(path):
            root = target.split(".")[0]
            if root in LAYERS and LAYERS[root] > LAYERS[layer]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target} ({layer} is below {root})")
            if root in HEAVY and layer in ("api", "models", "manage"):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target} ({layer} must not need the ML stack)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = project_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_wrong_import(tmp_path, monkeypatch):
    """The walker itself: a models module importing api, and a two-module cycle, are both caught."""
    fake = tmp_path / "repo"
    (fake / "models").mkdir(parents=True)
    (fake / "api").mkdir()
    (fake / "worker").mkdir()
    (fake / "manage.py").write_text("import api.a\n")
    (fake / "models" / "m.py").write_text("def f():\n    from api.a import x\n")
    (fake / "api" / "a.py").write_text("from api import b\n")
    (fake / "api" / "b.py").write_text("import api.a\nimport torch\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    with pytest.raises(AssertionError, match="models/m.py:2 imports api.a"):
        test_imports_run_down_the_layers_only()
    with pytest.raises(AssertionError, match="api.a -> api.b -> api.a"):
        test_no_import_cycles()


PROBE = """
import json, sys, runpy
sys.argv = ["manage.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("manage.py", run_name="__main__")
except SystemExit:
    pass
import api.adapters, api.jobs, api.report, api.sweeps, api.validate  # the whole application layer, too
print("LOADED=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


@pytest.mark.parametrize("args", [["--help"], ["jobs", "list"], ["report"]])
def test_fast_commands_never_load_the_ml_stack(env, args):
    probe = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), json.dumps(args)], env=env, cwd=REPO,
                           text=True, capture_output=True, timeout=120)
    loaded = json.loads(probe.stdout.rsplit("LOADED=", 1)[1])
    assert loaded == [], f"manage.py {' '.join(args)} loaded {loaded}"


def test_help_loads_neither_the_database_nor_the_broker_libraries(env):
    """`--help` builds its options from the specs alone: no SQLAlchemy, Celery, kombu or redis at start-up."""
    probe = subprocess.run([sys.executable, "-c", PROBE.replace("import api.adapters, api.jobs, api.report, "
                                                                  "api.sweeps, api.validate", "pass") % (LIBRARIES,),
                            json.dumps(["--help"])], env=env, cwd=REPO, text=True, capture_output=True, timeout=120)
    assert json.loads(probe.stdout.rsplit("LOADED=", 1)[1]) == []
