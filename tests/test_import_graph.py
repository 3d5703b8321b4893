"""The package's import graph: a DAG, imports at the top, layers that never point back up.

Read from the source with ``ast`` (nothing is imported). An edge A -> B means module A imports
module B; importing ``a.b.c`` also imports the packages ``a.b`` (their ``__init__``), so those
edges are added too. A function-local import is allowed only with a comment ``# local import:
<reason>`` on the line above it or on the same line (an optional dependency, a backend that
must not load on every platform).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "readme_jax"
PKG = "readme_jax"

# lower layers never import higher ones (a module may import its own layer and anything below)
LAYERS = [
    {"errors", "jsonfile", "figures", "fsutil"}, {"config"}, {"kernels"}, {"ops"}, {"model"}, {"checkpoints"}, {"data"}, {"convert"},
    {"distributed"}, {"eval"}, {"train"}, {"serve"}, {"bench"}, {"workflow"}, {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _targets(mod: str, is_pkg: bool, node) -> list[str]:
    """Modules of this package that an import statement loads (the named module, else its package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = mod.split(".") if is_pkg else mod.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for n in names:
        if n != PKG and not n.startswith(PKG + "."):
            continue
        while n not in MODULES and "." in n:
            n = n.rsplit(".", 1)[0]
        parts = n.split(".")
        out += [".".join(parts[:k]) for k in range(2, len(parts) + 1)]  # the packages on the way load too
    return [t for t in out if t != mod and not mod.startswith(t + ".")]


def _scan():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    local, unjustified, root_imports = [], [], []
    for mod, path in MODULES.items():
        src = path.read_text()
        lines = src.splitlines()
        is_pkg = path.name == "__init__.py"

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if isinstance(child, ast.ImportFrom) and child.module == PKG and mod != PKG:
                        bad = [a.name for a in child.names if f"{PKG}.{a.name}" not in MODULES]
                        if bad:
                            root_imports.append(f"{mod}:{child.lineno} imports {bad} from the package root")
                    edges[mod].update(_targets(mod, is_pkg, child))
                    if in_function:
                        where = f"{path.relative_to(ROOT.parent)}:{child.lineno}"
                        above = lines[child.lineno - 2] if child.lineno >= 2 else ""
                        same = lines[child.lineno - 1]
                        reason = next((x.split("# local import:", 1)[1].strip() for x in (same, above)
                                       if "# local import:" in x), "")
                        (local if reason else unjustified).append((where, reason))
                visit(child, inner)

        visit(ast.parse(src), False)
    return edges, local, unjustified, root_imports


EDGES, LOCAL, UNJUSTIFIED, ROOT_IMPORTS = _scan()


def _cycle(edges) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := dfs(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (c := dfs(v)):
            return c
    return None


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_the_graph_is_found():
    assert len(MODULES) > 50 and sum(map(len, EDGES.values())) > 100
    assert "readme_jax.model.moe" in EDGES["readme_jax.model.readme_model"]
    assert "readme_jax.model" in EDGES["readme_jax.serve.engine.step"]  # the package's __init__ loads too


def test_module_graph_is_acyclic():
    assert _cycle(EDGES) is None, " -> ".join(_cycle(EDGES))


def test_cycle_finder_finds_a_planted_cycle():
    planted = {k: set(v) for k, v in EDGES.items()}
    planted["readme_jax.config"].add("readme_jax.workflow.run")
    assert _cycle(planted) is not None


# serve/'s rooms (serve/__init__.py): a room imports only itself and the rooms before it
SERVE_ROOMS = [{"scheduling"}, {"engine"}, {"api", "sim"}]


def _room(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 3 or parts[1] != "serve":
        return None
    return next((i for i, names in enumerate(SERVE_ROOMS) if parts[2] in names), None)


def test_every_serve_module_is_in_a_room():
    loose = sorted(m for m in MODULES if m.startswith("readme_jax.serve.") and _room(m) is None)
    assert not loose, f"put {loose} in a room of serve/ (SERVE_ROOMS)"


def test_serve_rooms_never_import_upwards_or_sideways():
    bad = [f"{a} -> {b}" for a, ts in EDGES.items() for b in ts
           if _room(a) is not None and _room(b) is not None
           and (_room(b) > _room(a) or (_room(b) == _room(a) and a.split(".")[2] != b.split(".")[2]))]
    assert not bad, "\n".join(sorted(bad))


def test_every_subpackage_is_in_a_layer():
    missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set().union(*LAYERS))
    assert not missing, f"add {missing} to LAYERS"


def test_layers_never_import_upwards():
    up = [f"{a} -> {b}" for a, ts in EDGES.items() for b in ts
          if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not up, "\n".join(sorted(up))


def test_function_local_imports_are_justified():
    assert not UNJUSTIFIED, "function-local imports without '# local import: <reason>':\n" + "\n".join(
        w for w, _ in UNJUSTIFIED)
    assert len(LOCAL) <= 12, f"{len(LOCAL)} function-local imports; each should be a real exception"


def test_modules_do_not_import_the_package_root_namespace():
    assert not ROOT_IMPORTS, "\n".join(ROOT_IMPORTS)


@pytest.mark.parametrize("name", ["readme_jax.kernels", "readme_jax.config", "readme_jax.model"])
def test_low_layers_import_alone(name):
    """A low layer imports without pulling in a higher one (checked on the static graph)."""
    seen, todo = set(), [name]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += EDGES.get(v, ())
    limit = _layer(name)
    assert all(_layer(m) is None or _layer(m) <= limit for m in seen), sorted(m for m in seen if _layer(m) > limit)


def test_every_module_imports():
    """Each module under readme_jax imports (a bench or CLI module nobody else imports cannot rot
    unseen). Optional heavy packages are allowed to be missing only where the module says so."""
    import importlib
    import pkgutil

    import readme_jax

    bad = {}
    for m in pkgutil.walk_packages(readme_jax.__path__, "readme_jax."):
        try:
            importlib.import_module(m.name)
        except ImportError as e:  # an optional extra not installed here is fine; a missing module of ours is not
            if "readme_jax" in str(e):
                bad[m.name] = repr(e)
    assert not bad, bad
