"""The package's layers, read from its source: imports only go down (kernels < ops < model < app <
the top-level facade) and no module depends on itself through others (no import cycles).

Every import statement counts, including those inside functions: a lazy import is still a
dependency. The implicit import of a parent package (Python runs fpt_fast/__init__.py first) is
not a declared dependency and is not counted.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder of each package (kernels/ is installed as fpt_fast.kernels).
PACKAGES = {"fpt_fast": ROOT / "fpt_fast", "fpt_fast.kernels": ROOT / "kernels"}
# Layer of a module = the rank of the longest matching prefix; a module may import only modules of
# its own rank or below.
LAYERS = {"fpt_fast.kernels": 0, "fpt_fast.ops": 1, "fpt_fast.model": 2, "fpt_fast.app": 3, "fpt_fast": 4}
# Compiled modules (no Python source): an import of one is a dependency on the extension, not on
# the package that holds it.
EXTENSIONS = {"fpt_fast.ops._C"}


def module_files():
    """{module name: path} of every Python file of the package."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package] + parts)
            if package == "fpt_fast" and name.startswith("fpt_fast.kernels"):
                continue
            modules[name] = path
    return modules


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports_of(name: str):
    """The fpt_fast modules that module ``name`` imports, with the line of each import."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    base = name.split(".") if is_package(name) else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                origin = ".".join(anchor + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from X import y` depends on the submodule X.y when there is one, else on X itself.
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names
                       if f"{origin}.{a.name}" not in EXTENSIONS]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]  # `import fpt_fast.ops.api.x` -> the module part
            if target in MODULES and target != name:
                found.append((target, node.lineno))
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_layers_exist():
    for package in ("fpt_fast.ops", "fpt_fast.model", "fpt_fast.app", "fpt_fast.kernels"):
        assert package in MODULES and is_package(package), package


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name):
    upward = [f"{name} (line {line}) imports {target}" for target, line in GRAPH[name]
              if layer(target) > layer(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_kernels_import_nothing_else_of_fpt_fast():
    for name in MODULES:
        if layer(name) == 0:
            assert all(layer(t) == 0 for t, _ in GRAPH[name]), (name, GRAPH[name])


def test_no_import_cycles():
    # Depth-first search with colours; a grey module met again closes a cycle.
    colour, stack, cycles = {}, [], []

    def visit(name):
        colour[name] = "grey"
        stack.append(name)
        for target, _ in GRAPH[name]:
            if colour.get(target) == "grey":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in colour:
                visit(target)
        stack.pop()
        colour[name] = "black"

    for name in sorted(MODULES):
        if name not in colour:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser resolves relative imports: a model module importing the app is caught."""
    line = ast.parse("from ..app import train").body[0]
    base = "fpt_fast.model.frozen".split(".")[:-1]
    origin = ".".join(base[:len(base) - line.level + 1] + [line.module])
    assert origin == "fpt_fast.app" and layer(origin) > layer("fpt_fast.model.frozen")
