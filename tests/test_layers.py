"""The architecture, checked: ope's modules form layers, each importing only from its own layer
or the ones below, with no import circle (imports inside functions count too), and no source
file grows past what one reader takes in.

Layers, lowest first: the base vocabulary (errors, spec, requirements); the shared-memory
bridge and the runners, side by side and unaware of each other; packages (whose build checks a
TorchScript module by loading its runner); the host side; the public API and tools on top.
The worker's entry point (workers/) sits above them all, and nothing in ope imports it: the
host starts it as a program.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 600

# (rank, module prefixes): a module belongs to the layer of its longest matching prefix, and
# may import modules of its own layer or of a lower rank. Layers of the same rank may not
# import each other.
LAYERS = {
    "base": (0, ["ope.errors", "ope.spec", "ope.requirements", "ope.install_policy",
                  "ope.devices"]),
    "bridge": (1, ["ope.bridge"]),
    "runners": (1, ["ope.runners"]),
    "package": (2, ["ope.package"]),
    "host": (3, ["ope.host"]),
    "top": (4, ["ope", "ope.api", "ope.cli", "ope.demo", "ope.envs", "ope.modelset"]),
    "worker": (5, ["workers"]),
}


def _modules():
    """Module name -> path of every module under ope/ and workers/."""
    modules = {}
    for top in ("ope", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(name, path, modules):
    """The modules of ``modules`` that ``name`` imports anywhere in its source."""
    return _imports_in(name, path.read_text(), path.name == "__init__.py", modules)


def _imports_in(name, source, is_package, modules):
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {module for module in found if module in modules}


def _layer(name):
    matches = [(len(prefix), layer) for layer, (_, prefixes) in LAYERS.items()
               for prefix in prefixes if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def _upward_imports(graph):
    """'module (layer) imports target (layer)' for each import the layers forbid."""
    wrong = []
    for name, imported in sorted(graph.items()):
        layer = _layer(name)
        for target in sorted(imported):
            other = _layer(target)
            if other != layer and LAYERS[other][0] >= LAYERS[layer][0]:
                wrong.append(f"{name} ({layer}) imports {target} ({other})")
    return wrong


def _circle(graph):
    """An import circle of ``graph`` as a list of modules (the first one again at the end), or
    None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            circle = visit(target)
            if circle:
                return circle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        circle = visit(name)
        if circle:
            return circle
    return None


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if _layer(name) is None] == []


def test_each_layer_imports_only_its_own_or_lower_ones(graph):
    assert _upward_imports(graph) == []


def test_no_import_circle(graph):
    assert _circle(graph) is None


def test_ope_never_imports_workers(graph):
    assert [name for name, imported in graph.items() if name.startswith("ope")
            and any(target.startswith("workers") for target in imported)] == []


def test_no_source_file_is_longer_than_one_reader_takes_in():
    long = [f"{path.relative_to(ROOT)}: {lines} lines"
            for top in ("ope", "workers", "tests", "bench")
            for path in sorted((ROOT / top).rglob("*.py"))
            if (lines := len(path.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_a_lazy_import_of_the_api_from_the_package_layer_fails_both_checks(graph):
    """What the package build once did: import ope.api inside a function. The graph sees
    imports inside functions, and such an import is upward and closes a circle."""
    build = ROOT / "ope" / "package" / "build.py"
    source = build.read_text() + "\n\ndef _check(path):\n    from ope.api import self_check\n"
    changed = dict(graph)
    changed["ope.package.build"] = _imports_in("ope.package.build", source, False, graph)
    assert "ope.package.build (package) imports ope.api (top)" in _upward_imports(changed)
    assert _circle(changed) is not None
