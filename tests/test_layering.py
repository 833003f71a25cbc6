"""Imports inside palpcompose/ flow one way: down the layers below, and never in a cycle.

Every module's imports are read with `ast`, those inside functions (and under `if TYPE_CHECKING:`) included: an
import hidden in a function is still a dependency, and a cycle through one still means two modules that cannot be
understood apart. (palpcompose imports no module by name at run time, with importlib; such an import would not
count.) LAYERS is the one source of the layering; docs/architecture.md draws it. A module may import modules of
its own layer or of lower ones; an import of a higher layer fails, naming the file:line and the import. A module in
no layer fails too, so a new module gets a place in the table when it is written.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "palpcompose"

# Bottom to top. A module imports only modules of its own layer or of the layers before it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("palpcompose", "palpcompose.errors")),
    ("files", ("palpcompose.fsutil",)),
    ("facts", (  # formats and pure functions, each of one job; they know nothing of a project
        "palpcompose.choices", "palpcompose.images", "palpcompose.captions", "palpcompose.buckets",
        "palpcompose.placeholders",
        "palpcompose.tokens", "palpcompose.guidance", "palpcompose.flow_guidance", "palpcompose.conditioning",
        "palpcompose.memory", "palpcompose.distributed", "palpcompose.trackers", "palpcompose.quantize",
        "palpcompose.torchao_gate",
    )),
    ("toy world", (  # a leaf library: the toy world, its oracle and tokenizer, the demo's drawings
        "palpcompose.toyworld", "palpcompose.toyworld.world", "palpcompose.toyworld.oracle",
        "palpcompose.toyworld.tokenizer", "palpcompose.toyworld.worlds", "palpcompose.toyworld.demo",
        "palpcompose.toyworld.ceiling",
    )),
    ("models", (  # base models: one module per family, resolution, SD components (the package re-exports them)
        "palpcompose.models.family", "palpcompose.models.sd", "palpcompose.models.sdxl",
        "palpcompose.models.flow", "palpcompose.models.flux", "palpcompose.models.sd3",
        "palpcompose.models.families", "palpcompose.models.weight_files", "palpcompose.models.resolve",
        "palpcompose.models.defaults",
        "palpcompose.models.components", "palpcompose.models",
    )),
    ("trained weights", ("palpcompose.weights", "palpcompose.checkpoint")),  # their files (LoRA keys: models')
    ("project", (  # palp.toml: schema, settings rules, validation, references, load, init, check, its doc
        "palpcompose.project.schema", "palpcompose.project.settings", "palpcompose.project.validation",
        "palpcompose.project.references", "palpcompose.project.load", "palpcompose.project.init",
        "palpcompose.project.check", "palpcompose.project.schema_doc", "palpcompose.project",
    )),
    ("out folder", ("palpcompose.outputs",)),  # the out/ layout, run lookup and staleness (reads project settings)
    ("command parts", (  # one job each of train and render: data, the step, previews, a run's lifecycle, ...
        "palpcompose.data", "palpcompose.step", "palpcompose.flow_step", "palpcompose.previews",
        "palpcompose.encoder_offload",
        "palpcompose.progress", "palpcompose.run", "palpcompose.attach", "palpcompose.contact_sheet",
        "palpcompose.report_data", "palpcompose.report_parts", "palpcompose.sampling",
        "palpcompose.toyworld.demo_compare",  # scripts/demo's baseline and side-by-side sheet (reads out/renders)
    )),
    ("commands", (  # one library function per command; eval renders first (evaluate imports render)
        "palpcompose.train", "palpcompose.render", "palpcompose.export", "palpcompose.evaluate",
        "palpcompose.report",
    )),
    ("entry points", ("palpcompose.cli", "palpcompose.toyworld.__main__", "palpcompose.project.__main__")),
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of the package
    file: Path
    line: int
    text: str  # the import statement as written

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def module_name(path: Path, package_dir: Path, package: str) -> str:
    parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def module_graph(package_dir: Path, package: str) -> dict[str, list[Import]]:
    """{module: the imports of modules of `package` it makes anywhere in its file}, for every module of the package
    (`import a.b`, `from a import b`, `from .b import c`, `from .. import b`; at module level or inside functions)."""
    files = {module_name(p, package_dir, package): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, list[Import]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        source = path.read_text()
        edges = []
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package this module is in (or is)
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import name` imports pkg.mod
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                           for alias in node.names]
            else:
                continue
            text = ast.get_source_segment(source, node) or ast.dump(node)
            for target in dict.fromkeys(targets):
                while target and target not in files and "." in target:  # `import pkg.mod.attr` -> pkg.mod
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    edges.append(Import(name, target, path, node.lineno, " ".join(text.split())))
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """Import cycles, each as the imports that close it (a -> b -> ... -> a); one per strongly connected group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:  # one concrete cycle through the group: follow edges inside it until a module repeats
        start = min(group)
        path, seen, node = [], {start: 0}, start
        while True:
            edge = next(e for e in graph[node] if e.target in group)
            path.append(edge)
            if edge.target in seen:
                cycles.append(path[seen[edge.target]:])
                break
            seen[edge.target] = len(path)
            node = edge.target
    return cycles


def layer_problems(graph: dict[str, list[Import]], layers) -> list[str]:
    """Modules in no layer (or in two), and every import of a higher layer than the importer's."""
    level: dict[str, int] = {}
    problems = []
    for n, (_, modules) in enumerate(layers):
        for module in modules:
            if module in level:
                problems.append(f"{module} is in two layers")
            level[module] = n
    for module in sorted(graph):
        if module not in level:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py (and to "
                            "docs/architecture.md)")
    for module, edges in sorted(graph.items()):
        for edge in edges:
            if module in level and edge.target in level and level[edge.target] > level[module]:
                problems.append(f"{edge.where()}: {module} (layer {layers[level[module]][0]!r}) imports "
                                f"{edge.target} of the higher layer {layers[level[edge.target]][0]!r}")
    return problems


def describe(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].source] + [e.target for e in cycle]) + "\n" + "\n".join(
        f"    {e.where()}" for e in cycle)


@pytest.fixture(scope="module")
def graph():
    return module_graph(PACKAGE_DIR, "palpcompose")


def test_no_import_cycle_in_palpcompose(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in palpcompose/:\n" + "\n".join(describe(c) for c in cycles)


def test_imports_go_down_the_layers(graph):
    problems = layer_problems(graph, LAYERS)
    assert not problems, "imports against the layering (tests/test_layering.py, docs/architecture.md):\n" + "\n".join(
        problems)


def test_the_walk_sees_module_level_and_function_level_imports(graph):
    """The graph of the real package is not empty: a module-level import and one inside a function are edges."""
    edges = {(e.source, e.target) for edges in graph.values() for e in edges}
    assert ("palpcompose.render", "palpcompose.outputs") in edges  # module level
    assert ("palpcompose.cli", "palpcompose.render") in edges  # inside a command function
    # `from palpcompose.toyworld.world import ...`
    assert ("palpcompose.project.check", "palpcompose.toyworld.world") in edges


def _write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "import os\n\n\ndef f():\n    from pkg import b\n    return b\n",
        "b.py": "from pkg.a import f\n",
        "c.py": "from . import b\n",  # relative, and not part of the cycle
    })
    graph = module_graph(package, "pkg")
    assert {e.target for e in graph["pkg.c"]} == {"pkg.b"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    text = describe(cycles[0])
    assert {e.source for e in cycles[0]} == {"pkg.a", "pkg.b"}
    assert f"{package / 'a.py'}:5: from pkg import b" in text and f"{package / 'b.py'}:1: from pkg.a import f" in text


def test_an_import_of_a_higher_layer_is_named_with_its_file_and_line(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from . import high\n",
        "high.py": "import pkg.low\n",
        "sub/__init__.py": "from .. import low\n",  # a package's relative import, two dots: pkg
    })
    graph = module_graph(package, "pkg")
    layers = (("bottom", ("pkg", "pkg.low")), ("top", ("pkg.high",)))
    problems = layer_problems(graph, layers)
    assert f"{package / 'low.py'}:2: from . import high: pkg.low (layer 'bottom') imports pkg.high of the " \
           "higher layer 'top'" in problems
    assert ("pkg.sub is in no layer: add it to LAYERS in tests/test_layering.py (and to docs/architecture.md)"
            in problems)
    assert {e.target for e in graph["pkg.sub"]} == {"pkg.low"}
