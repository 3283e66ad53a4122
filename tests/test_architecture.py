"""The package's shape (issue 20): no import cycle between its modules, lazy imports included; no private name
imported across modules; the loop small enough to read in one sitting."""
import ast
from pathlib import Path

import trainloop_nb

PACKAGE = Path(trainloop_nb.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    "Every `from X import names` and `import X` of a trainloop_nb module in `path`, at any depth (lazy ones too)."
    name, found = module_name(path), []
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else: target = node.module or ""
            if target.startswith("trainloop_nb"): found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("trainloop_nb")]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.name not in ("_modidx.py",)}


def test_no_import_cycle_between_the_packages_modules_lazy_imports_included():
    graph = {m: {t for t, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    graph.pop("trainloop_nb", None)  # the package's __init__ imports every module by name, on first use only
    for edges in graph.values(): edges.discard("trainloop_nb")
    seen, done, cycles = set(), set(), []
    def visit(node, path):
        if node in done: return
        if node in seen:
            cycles.append(path[path.index(node):] + [node])
            return
        seen.add(node)
        for target in sorted(graph.get(node, ())): visit(target, path + [node])
        done.add(node)
    for node in sorted(graph): visit(node, [])
    assert cycles == []


def test_no_private_name_is_imported_across_modules():
    private = [(m, t, n) for m, p in MODULES.items() for t, names in imports(p) for n in names
               if n.startswith("_") and t != m]
    assert private == []


def test_the_loop_reads_in_one_sitting():
    source = (PACKAGE / "loop.py").read_text()
    lines = source.splitlines()
    assert len(lines) <= 600 and max(len(line) for line in lines) <= 120
    tree = ast.parse(source)
    # The class and every method patched onto it (fastcore's @patch), counted together.
    spans = [n.end_lineno - n.lineno + 1 for n in tree.body
             if isinstance(n, ast.ClassDef) and n.name == "TrainingLoop"
             or isinstance(n, ast.FunctionDef) and n.args.args and isinstance(n.args.args[0].annotation, ast.Name)
             and n.args.args[0].annotation.id == "TrainingLoop"]
    assert len(spans) > 20 and sum(spans) <= 400


def test_no_two_modules_export_different_objects_under_one_name():
    "`from trainloop_nb import *` copies every module's public names: a name exported twice would hide one of them."
    import importlib
    owners = {}
    for name in trainloop_nb._MODULES:
        module = importlib.import_module(f"trainloop_nb.{name}")
        for public in module.__all__: owners.setdefault(public, set()).add(id(getattr(module, public)))
    assert {name: len(ids) for name, ids in owners.items() if len(ids) > 1} == {}
