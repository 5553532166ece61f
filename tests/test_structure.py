"""The shape of the package: one road through it, no import loops, no private names
crossing modules, one launcher of the routing kernels, immutable shared options."""

import ast
import dataclasses
from pathlib import Path

import pytest

import dpmoe

PACKAGE = Path(dpmoe.__file__).parent


def modules():
    """{module name: AST} for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return found


def imports(name, tree, is_package):
    """(imported module, imported names) pairs of one module, relative imports resolved,
    at any depth (imports inside functions count too)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[:len(base) - node.level + 1]
                module = ".".join(target + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def graph():
    known = modules()
    edges = {}
    for name, (tree, is_package) in known.items():
        targets = set()
        for module, imported in imports(name, tree, is_package):
            if f"{module}.{imported}" in known:  # "from . import reference"
                targets.add(f"{module}.{imported}")
            elif module in known:
                targets.add(module)
        targets.discard(name)
        edges[name] = targets
    return edges


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    packages = {name for name, (_, is_package) in modules().items() if is_package}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt in packages and nxt != "dpmoe":  # a package's __init__ imports nothing here
                continue
            if nxt == "dpmoe":
                continue  # "from dpmoe import x" resolves to x, listed on its own
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import loops: {cycles}"


def test_private_names_are_not_imported_across_modules():
    """Package-private modules (``_engine``, ``_dispatch``) are the package's own; a
    module's private names are its own."""
    known = modules()
    crossing = [(name, module, imported) for name, (tree, is_package) in known.items()
                for module, imported in imports(name, tree, is_package)
                if module.startswith("dpmoe") and imported and imported.startswith("_")
                and not imported.startswith("__") and f"{module}.{imported}" not in known]
    assert not crossing, crossing


@pytest.mark.parametrize("foundation", ["dpmoe.arrays", "dpmoe.pages", "dpmoe.memory"])
def test_foundations_import_nothing_above_them_and_launch_no_kernels(foundation):
    below = {"dpmoe.device", "dpmoe._runtime", "dpmoe._fork", "dpmoe.memory", "dpmoe.pages",
             "dpmoe.arrays"}
    reached = graph()[foundation] - {foundation}
    assert reached <= below, reached - below
    assert not any(t.startswith("dpmoe.kernels") for t in reached)


def test_routing_kernels_are_launched_only_by_routing():
    factories = ("make_topk_softmax_kernel", "make_grouped_topk_kernel")
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if any(f in path.read_text() for f in factories))
    assert users == ["kernels/routing.py", "routing.py"], users


def test_only_the_plan_reads_the_tuned_configs():
    readers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if "get_config(" in path.read_text() and path.name != "tuning.py")
    assert readers == ["_engine/plan.py"], readers


def test_library_does_not_import_the_benchmark():
    edges = graph()
    assert not [name for name, targets in edges.items()
                if "dpmoe.bench" in targets and name != "dpmoe.bench"]


def test_bench_uses_no_private_runner():
    tree, is_package = modules()["dpmoe.bench"]
    reached = {module for module, _ in imports("dpmoe.bench", tree, is_package)}
    assert not [m for m in reached if m.startswith("dpmoe._engine")], reached


def test_expert_options_are_immutable():
    from dpmoe._engine.experts import DEFAULT_OPTIONS

    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_OPTIONS.scale = 2.0


def test_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    missing = [path.name for path in PACKAGE.glob("*.py")
               if path.name not in ("__init__.py",) and path.name not in layout]
    missing += [f"{d.name}/" for d in PACKAGE.iterdir()
                if d.is_dir() and not d.name.startswith("__") and f"{d.name}/" not in layout]
    assert not missing, missing
