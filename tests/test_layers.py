"""The package's import structure: layers without back-edges, no import cycles, no method names
compared outside ``occreid.methods``, function-local imports only for optional dependencies."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import occreid

PKG = Path(occreid.__file__).parent

#: Lowest first; a module may import its own layer's packages or lower ones only.
LAYERS: List[Set[str]] = [
    {"occreid", "utils", "_env"},  # the package root only defines __version__ (and lazy attributes)
    {"config", "configs", "data", "models", "losses"},
    {"methods"},
    {"evaluation"},
    {"engine"},
    {"inference", "retrieval", "export", "viz"},
    {"demo", "ablation"},
    {"cli"},
]
#: Packages of one layer that must not import each other either.
SIBLINGS_APART = [("data", "models"), ("data", "losses"), ("models", "losses")]


def layer_of(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"package occreid.{top} is in no layer of tests/test_layers.py: add it")


def modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(mod: str, path: Path) -> Iterator[Tuple[str, bool, int]]:
    """(imported occreid module, imported inside a function, line) for each import."""
    is_pkg = path.name == "__init__.py"
    pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(c) for f in funcs for c in ast.walk(f) if c is not f}
    for node in ast.walk(tree):
        local = id(node) in inner
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            for t in names:
                yield _module(t), local, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield _module(a.name), local, node.lineno


def top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "occreid"


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _module(name: str) -> str:
    """``occreid.x.name`` -> the module ``occreid.x`` when ``name`` is not a module itself."""
    if name.startswith("occreid"):
        while name != "occreid" and not is_module(name):
            name = name.rsplit(".", 1)[0]
    return name


def graph() -> Dict[str, Set[str]]:
    out: Dict[str, Set[str]] = {}
    for mod, path in modules():
        out[mod] = {t for t, _, _ in imports(mod, path) if t.startswith("occreid")} - {mod}
    return out


def test_no_import_reaches_up_a_layer():
    bad = []
    for mod, path in modules():
        src = top(mod)
        for t, _, line in imports(mod, path):
            if not t.startswith("occreid") or top(t) == src:
                continue
            dst = top(t)
            if layer_of(dst) > layer_of(src) or (src, dst) in SIBLINGS_APART or (dst, src) in SIBLINGS_APART:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {t}")
    assert not bad, "imports that reach up a layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep == "occreid":  # the root imports nothing eagerly
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [mod])
    # a package __init__ importing its own submodules is not a cycle of files
    real = [c for c in cycles if not all(a.startswith(c[0]) or c[0].startswith(a) for a in c)]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_local_imports_only_for_optional_dependencies():
    bad = []
    for mod, path in modules():
        for t, local, line in imports(mod, path):
            if local and t.startswith("occreid"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {t}")
    assert not bad, "function-local imports of occreid modules (import them at the top):\n" + "\n".join(bad)


def test_no_method_name_compared_outside_methods():
    """Outside occreid/methods no code compares a value with a method's name: it asks the spec."""
    names = {"baseline", "fed", "dpm"}
    bad = []
    for mod, path in modules():
        if top(mod) == "methods":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                for c in [node.left, *node.comparators]:
                    if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                        consts += [e for e in c.elts if isinstance(e, ast.Constant)]
                if any(isinstance(c.value, str) and c.value.lower() in names for c in consts):
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
                if len(names & set(keys)) >= 2:  # a per-method table
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} (a table keyed by method names)")
    assert not bad, "method names compared outside occreid.methods:\n" + "\n".join(bad)
