"""The house runs one way: no module imports a layer above it, and there is no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lsm_registry"

#: Bottom (0) to top. A module may import its own layer or the ones below it.
LAYERS = [
    {"version", "errors", "params", "interfaces", "hookspecs", "ops", "formats", "files", "memory"},
    {"registry", "renames", "components", "data", "plugins", "recipe", "recipe_files"},
    {"mixing"},
    {"metrics", "checkpoint", "stages", "assembly", "engine"},
    {"runfolder", "viz", "testing"},
    {"api", "cli", "__main__"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _imports(path: Path) -> set[str]:
    """lsm_registry modules ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = _module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("lsm_registry"):
                names = [node.module.removeprefix("lsm_registry").lstrip(".")]
            else:
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("lsm_registry.") for a in node.names if a.name.startswith("lsm_registry."))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} is in no layer of this test; add it to LAYERS")


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_layer_above_it():
    upward = []
    for module, path in MODULES.items():
        if module == "__init__":
            continue  # the public API re-exports the ABI
        for target in _imports(path):
            if target and _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


def test_only_the_entry_point_imports_the_command_line():
    importers = [
        m
        for m, p in MODULES.items()
        if not m.startswith("cli") and m != "__main__" and any(t.split(".")[0] == "cli" for t in _imports(p))
    ]
    assert importers == []


def test_there_is_no_import_circle():
    graph = {m: {t for t in _imports(p) if t in MODULES} for m, p in MODULES.items() if m != "__init__"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_function_level_imports_of_the_library():
    """Imports inside functions hid the old circle; only optional extras may be imported late."""
    late = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (
                        node.level or (node.module or "").startswith("lsm_registry")
                    ):
                        late.append(f"{module}.{fn.name}")
    assert not late, ", ".join(late)


def _statement_lines(fn: ast.AST) -> int:
    """Lines on which a statement of ``fn`` starts: its length as written, whatever the formatter
    does with one long call (ruff format splits a call over many lines)."""
    return len({node.lineno for node in ast.walk(fn) if isinstance(node, ast.stmt)})


def test_functions_stay_short_and_the_loop_reads_as_the_loop():
    """A function of over 50 statements hides a second job; Trainer.fit (and the _fit it wraps) is the loop only."""
    long = []
    for module, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _statement_lines(fn)
                limit = 30 if module == "engine" and fn.name in ("fit", "_fit") else 50
                if lines > limit:
                    long.append(f"{module}.{fn.name} ({lines} statements)")
    assert not long, ", ".join(long)


def test_no_attribute_is_reached_past_its_interface():
    hidden = [
        module for module, path in MODULES.items() if "type: ignore[attr-defined]" in path.read_text(encoding="utf-8")
    ]
    assert not hidden, ", ".join(hidden)


def test_bench_is_a_package_imported_by_name():
    """bench/ runs as python -m bench.<name>; no script edits sys.path or is loaded by its file path."""
    root = PACKAGE.parent
    offenders = [
        str(p.relative_to(root))
        for folder in ("bench", "tests")
        for p in (root / folder).glob("*.py")
        if p.name != "test_layers.py"
        and any(s in p.read_text(encoding="utf-8") for s in ("sys.path.insert", "spec_from_file_location"))
    ]
    assert (root / "bench" / "__init__.py").is_file() and not offenders, offenders


def test_the_training_loop_names_no_method():
    """BBN, RIDE, the contrastive family and PC land as components and general extension points:
    the loop's modules never name one (a method name there would be a branch for one method)."""
    import re

    methods = ["bbn", "ride", "supcon", "hybrid", "hybrid-sc", "sbcl", "tsc", "pc", "prototype"]
    for name in ("engine.py", "assembly.py", "mixing.py"):
        text = (PACKAGE / name).read_text(encoding="utf-8").lower()
        named = [m for m in methods if re.search(rf"\b{m}s?\b", text)]
        assert not named, f"lsm_registry/{name} names {named}"
