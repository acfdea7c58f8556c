"""The package's shape: imports run one way with no circle, the promised layers hold, and nothing heavy loads
before a run starts (composition, the pre-run check, `--help`, `--cfg job` and every refusal).

The import graph is read statically (ast) from every module under src/, so an import inside a function, which
runs only when that function does, is still a dependency: it closes a circle as surely as a top-level one, only later.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# What only a run needs. None of it may load to compose a config, check a command line, or refuse one.
HEAVY = {"torch", "torchvision", "sklearn", "mlflow", "torchao", "onnx", "onnxruntime", "onnxscript",
         "torch_pruning", "mlxtend", "matplotlib", "optuna", "sqlalchemy"}


# --- the import graph ---------------------------------------------------------------------------------------------


class Edge(NamedTuple):
    source: str
    target: str
    line: int
    deferred: bool  # inside a function: runs when the function is called, not when the module is imported

    def __str__(self) -> str:
        return f"{self.target} (line {self.line}{', in a function' if self.deferred else ''})"


def project_modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted name -> file of every module under root/<package> (links followed: src/pqsweep/conf is one)."""
    modules = {}
    for package in packages:
        for folder, _, files in os.walk(root / package, followlinks=True):
            for name in files:
                if name.endswith(".py"):
                    path = Path(folder) / name
                    parts = list(path.relative_to(root).with_suffix("").parts)
                    if parts[-1] == "__init__":
                        parts.pop()
                    modules[".".join(parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """Every import statement of one module, with whether it sits inside a function."""

    def __init__(self):
        self.found: list[tuple[str, list[str], int, int, bool]] = []  # (module, names, level, line, deferred)
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.found.append((alias.name, [], 0, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        self.found.append((node.module or "", [a.name for a in node.names], node.level, node.lineno, self.depth > 0))


def import_edges(modules: dict[str, Path], prefixes: tuple[str, ...]) -> list[Edge]:
    """Edges from each module to what it imports whose name starts with one of `prefixes` (the project's own).

    `from a import b` is an edge to a.b when a.b is a module, else to a. Relative imports are resolved.
    """
    edges = []
    for name, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module, names, level, line, deferred in visitor.found:
            if level:
                base = package.split(".")[: len(package.split(".")) - (level - 1)]
                module = ".".join(base + ([module] if module else []))
            targets = [f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names] or [module]
            for target in dict.fromkeys(targets):
                if target.startswith(prefixes):
                    edges.append(Edge(name, target, line, deferred))
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) for each strongly connected component that has one (Tarjan, then a BFS inside)."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node: str) -> None:  # recursive Tarjan: the graph has a few dozen nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and not any(e.target == start for e in graph[start]):
            continue
        # shortest way from start back to itself, inside the component
        came_by: dict[str, Edge] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for edge in graph[node]:
                if edge.target in component and edge.target not in came_by:
                    came_by[edge.target] = edge
                    queue.append(edge.target)
            if start in came_by:
                break
        path, node = [], start
        while True:
            edge = came_by[node]
            path.append(edge)
            node = edge.source
            if node == start:
                break
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].source] + [str(edge) for edge in cycle])


def path_to(edges: list[Edge], source: str, forbidden) -> list[Edge] | None:
    """The shortest chain of imports from `source` to a module `forbidden(name)` accepts, or None."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
    came_by: dict[str, Edge] = {}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for edge in graph.get(node, []):
            if edge.target in came_by or edge.target == source:
                continue
            came_by[edge.target] = edge
            if forbidden(edge.target):
                chain, at = [], edge.target
                while at != source:
                    chain.append(came_by[at])
                    at = came_by[at].source
                return chain[::-1]
            queue.append(edge.target)
    return None


MODULES = project_modules(SRC, ["pqsweep", "hydra_plugins/pqsweep_sweeper"])
EDGES = import_edges(MODULES, ("pqsweep", "hydra_plugins.pqsweep_sweeper"))


def _in(*packages: str):
    return lambda name: any(name == p or name.startswith(p + ".") for p in packages)


# --- the graph helpers find what they claim to (on a package written for the purpose) -------------------------


def test_graph_helpers_see_a_cycle_closed_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("import os\n\ndef later():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom pkg.b import later\n")
    modules = project_modules(tmp_path, ["pkg"])
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    edges = import_edges(modules, ("pkg",))
    assert {(e.source, e.target, e.deferred) for e in edges} == {
        ("pkg.a", "pkg.b", False), ("pkg.b", "pkg.sub.c", True), ("pkg.sub.c", "pkg.a", False),
        ("pkg.sub.c", "pkg.b", False)}
    cycles = find_cycles(edges)
    assert len(cycles) == 1
    assert describe(cycles[0]).startswith("pkg.a -> pkg.b (line 1) -> pkg.sub.c (line 4, in a function) -> pkg.a")
    assert [e.target for e in path_to(edges, "pkg.a", _in("pkg.sub"))] == ["pkg.b", "pkg.sub.c"]
    assert path_to(edges, "pkg.sub.c", _in("os")) is None
    assert find_cycles([e for e in edges if not e.deferred]) == []


# --- the package's own graph -------------------------------------------------------------------------------------


def test_the_layout_is_the_promised_one():
    """The modules the README and the docs name exist where they say (a rename must update them)."""
    expected = {"pqsweep." + m for m in [
        "cli", "preflight", "environment", "checks", "schema", "options", "validate", "identity", "stages", "metrics", "weights", "data", "models",
        "train", "measure", "export", "cache", "pipeline", "trial", "tracking", "records", "sensitivity", "conf",
        "sweeper", "sweeper.space", "sweeper.study", "sweeper.ledger", "sweeper.command", "sweeper.loop",
        "sweeper.watch",
        "pruning", "pruning.unstructured", "pruning.structured", "pruning.iterative",
        "quantization.cast", "quantization.engine", "quantization.dynamic", "quantization.static", "quantization.fx",
        "quantization.qat", "quantization.mixed", "quantization.pt2e", "quantization.fake_quant",
        "quantization.weight_only", "quantization.sparse", "reports.table", "reports.sensitivity"]}
    assert expected <= set(MODULES), sorted(expected - set(MODULES))
    assert "hydra_plugins.pqsweep_sweeper" in MODULES
    # the graph reads real imports: the CLI's own, at the top and inside a function
    assert {(e.target, e.deferred) for e in EDGES if e.source == "pqsweep.cli"} >= {
        ("pqsweep.preflight", False), ("pqsweep.checks", False), ("pqsweep.trial", True)}


def test_no_import_cycle_inside_the_package():
    cycles = find_cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_weights_is_a_leaf():
    mine = [e for e in EDGES if e.source == "pqsweep.weights"]
    assert not mine, "pqsweep.weights imports " + ", ".join(map(str, mine))


LAYERS = [
    # (modules, what none of them may import, directly or through other pqsweep modules)
    (_in("pqsweep.pruning", "pqsweep.quantization"),
     ("pqsweep.pipeline", "pqsweep.cli", "pqsweep.tracking", "pqsweep.reports", "pqsweep.sensitivity")),
    (_in("pqsweep.pipeline"), ("pqsweep.cli", "pqsweep.tracking", "pqsweep.records", "pqsweep.trial",
                               "pqsweep.reports")),
    (_in("pqsweep.reports"), ("pqsweep.cli", "pqsweep.sensitivity", "pqsweep.pipeline", "pqsweep.trial")),
    # MLflow's side records what the trial hands it: it never drives the pipeline
    (_in("pqsweep.tracking", "pqsweep.records"), ("pqsweep.pipeline", "pqsweep.trial", "pqsweep.cli")),
    # the declarations and the schema know no stage's work, and the search space no store
    (_in("pqsweep.identity", "pqsweep.stages", "pqsweep.schema", "pqsweep.options", "pqsweep.validate",
         "pqsweep.metrics", "pqsweep.checks", "pqsweep.environment"),
     ("pqsweep.cache", "pqsweep.pipeline", "pqsweep.tracking", "pqsweep.sweeper", "pqsweep.train")),
    (_in("pqsweep.sweeper.space"), ("pqsweep.tracking", "pqsweep.sweeper.study", "pqsweep.sweeper.ledger",
                                    "pqsweep.sweeper.loop", "pqsweep.pipeline")),
]


@pytest.mark.parametrize("members, forbidden", LAYERS,
                         ids=["methods", "pipeline", "reports", "tracking", "declarations", "search_space"])
def test_layers_import_one_way(members, forbidden):
    sources = sorted(m for m in MODULES if members(m))
    assert sources
    broken = {}
    for source in sources:
        chain = path_to(EDGES, source, _in(*forbidden))
        if chain:
            broken[source] = " -> ".join([source] + [str(e) for e in chain])
    assert not broken, "layering broken:\n" + "\n".join(broken.values())


# --- nothing heavy before a run ------------------------------------------------------------------------------


CHECKS = textwrap.dedent("""
    import json, sys
    from pqsweep.schema import register
    register()  # check() composes against the schemas in Hydra's ConfigStore (pqsweep.cli registers them on import)
    from pqsweep.preflight import check
    results = {
        "valid": check(["pruning=global_magnitude", "pruning.amount=0.5", "quantization=static_int8"]),
        "grid": check(["pruning=global_magnitude", "pruning.amount=0,0.9", "quantization=none,fp16"]),
        "sweep file": check(["sweep=mnist_cnn_sparsity_x_precision"]),
        "typo": check(["pruning=global_magnitud"]),
    }
    after_check = sorted(sys.modules)
    import pqsweep.cli
    print(json.dumps({"results": results, "after_check": after_check, "after_cli": sorted(sys.modules)}))
""")


def _roots(names) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_preflight_and_the_cli_module_import_nothing_heavy(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHECKS], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    results = report["results"]
    assert results["valid"] is None and results["grid"] is None and results["sweep file"] is None, results
    assert results["typo"].startswith("pruning=global_magnitud is not an option; allowed: ")
    assert "global_magnitude" in results["typo"]
    assert {"hydra", "omegaconf", "pqsweep"} <= _roots(report["after_check"])
    assert "pqsweep.cli" in report["after_cli"]
    assert not _roots(report["after_check"]) & HEAVY, sorted(_roots(report["after_check"]) & HEAVY)
    assert not _roots(report["after_cli"]) & HEAVY, sorted(_roots(report["after_cli"]) & HEAVY)


def _pqsweep() -> str:
    script = Path(sys.executable).parent / "pqsweep"
    assert script.is_file(), f"no console script next to {sys.executable}: is pqsweep installed in this venv?"
    return str(script)


# -X importtime times only `import` statements: a module loaded by importlib.import_module (Hydra's plugin scan,
# hydra.utils.get_method) is missing from its list, only the statements inside it show. -v (PYTHONVERBOSE) names
# every module however it was loaded, so both are read.
PROFILED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$")
VERBOSE = re.compile(r"^import '([\w.]+)' #")


@pytest.mark.parametrize("arguments, code", [(["--help"], 0), (["--cfg", "job"], 0), (["model=nope"], 1)],
                         ids=["help", "cfg-job", "refusal"])
def test_the_command_imports_nothing_heavy_before_a_run(tmp_path, arguments, code):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "PYTHONVERBOSE": "1"}
    done = subprocess.run([_pqsweep(), *arguments], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    profiled = {m.group(1) for m in map(PROFILED.match, lines) if m}
    loaded = {m.group(1) for m in map(VERBOSE.match, lines) if m}
    assert {"hydra", "omegaconf"} <= _roots(profiled)  # the profile was read: it names what did load
    assert {"pqsweep.cli", "pqsweep.preflight", "pqsweep.validate", "pqsweep.identity"} <= loaded
    if arguments != ["--help"]:  # Hydra ran, and found the sweeper plugin: its discovery imports no Optuna
        assert "hydra_plugins.pqsweep_sweeper" in loaded and "pqsweep.sweeper" in loaded
    heavy = (_roots(profiled) | _roots(loaded)) & HEAVY
    assert not heavy, f"pqsweep {' '.join(arguments)} imported {sorted(heavy)}"
    if code:
        errors = [line for line in lines if line.startswith("pqsweep:")]
        assert len(errors) == 1 and errors[0].startswith("pqsweep: error: model=nope is not an option; allowed: ")
    assert list(tmp_path.iterdir()) == []  # nothing written: no outputs/, store or cache
