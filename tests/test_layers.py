"""The architecture holds (docs/architecture.md): C++ folders include only the layers below them, only
cpp/backends.cpp asks which backend the build has, and the Python package has no import cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"

# What each folder of cpp/ may include (itself included). cuda/ is a backend: it builds on the layers
# up to vision but never on the method (x2l/), which in turn never names a backend.
ALLOWED = {
    "core": {"core"},
    "cpu": {"core", "cpu"},
    "llm": {"core", "cpu", "llm"},
    "vision": {"core", "cpu", "llm", "vision"},
    "x2l": {"core", "cpu", "llm", "vision", "x2l"},
    "cuda": {"core", "cpu", "llm", "vision", "cuda"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _sources():
    if not CPP.is_dir():
        pytest.skip("no source tree next to the tests")
    return sorted(p for p in CPP.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh", ".inc"))


def test_cpp_layers_include_downwards():
    bad = []
    for path in _sources():
        rel = path.relative_to(CPP)
        if len(rel.parts) < 2:
            continue  # cpp/backends.{h,cpp}: the top, may include every layer but x2l
        layer = rel.parts[0]
        for inc in INCLUDE.findall(path.read_text(errors="replace")):
            if "/" not in inc:
                continue  # a file of the same folder (unicode_data.inc)
            if inc.split("/")[0] not in ALLOWED[layer]:
                bad.append(f"{rel}: #include \"{inc}\"")
    assert not bad, "includes against the layering:\n" + "\n".join(bad)


def test_backends_is_the_only_place_that_asks_for_cuda():
    asks = re.compile(r"^\s*#\s*(if|ifdef|ifndef|elif)\b.*\bX2L_(HAVE_CUDA|CUDA_EMULATED)\b", re.M)
    users = []
    for path in _sources() + sorted((ROOT / "bindings").rglob("*.[ch]*")):
        if asks.search(path.read_text(errors="replace")):
            users.append(str(path.relative_to(ROOT)))
    assert users == ["cpp/backends.cpp"], users
    assert len(asks.findall((CPP / "backends.cpp").read_text())) == 1  # one #ifdef, one place
    top = (CPP / "backends.cpp").read_text() + (CPP / "backends.h").read_text()
    assert '"x2l/' not in top  # the method sits above the backends, never below


def _imports(path: Path, package: str) -> set[str]:
    """Modules of `package` that the file imports (absolute or relative, at any depth of the file)."""
    tree = ast.parse(path.read_text())
    mod_parts = [package] + list(path.relative_to(PKG).with_suffix("").parts)
    if mod_parts[-1] == "__init__":
        mod_parts.pop()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod_parts[: len(mod_parts) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` needs pkg, which is sub's parent and imported first anyway: the edge goes
            # to sub when it is a module, to pkg (the graph's fallback) when the name lives in pkg itself
            names = [target + "." + a.name for a in node.names]
            for t in names:
                if t.startswith(package):
                    found.add(t)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


PKG = ROOT / "x2l_edge"


def test_python_package_has_no_import_cycle():
    if not PKG.is_dir():
        pytest.skip("no source tree next to the tests")
    modules = {}
    for path in PKG.rglob("*.py"):
        parts = ["x2l_edge"] + list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        # a package import runs its __init__: edges go to modules, imported names resolve to their module
        graph[name] = {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(path, "x2l_edge")} & set(modules)
        graph[name].discard(name)
    # the package __init__ imports everything; a module importing the package root is not a cycle of concern
    for name in graph:
        graph[name].discard("x2l_edge")
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)
    assert "x2l_edge.session" not in graph["x2l_edge.x2l"]
