"""The import graph of prdp_ds/ and kernels/ has no cycles, and kernels/ stands alone.

The graph is read from the source with `ast` (nothing is imported). Every `import` and
`from ... import` anywhere in a module is an edge, function-local ones included, except those
under `if TYPE_CHECKING:` (they never run: type-only imports). `import a.b.c` is an edge to a.b.c;
`from a.b import c` is an edge to a.b (it runs a.b, a package's __init__ included) and also to a.b.c
when that is a module; relative imports are resolved against the importing module's package; a package
is its __init__. The parent packages Python initializes on the way to `import a.b.c` or `from a.b.c
import x` are not edges (a package's __init__ may re-export its submodules, which then import each
other by full name). Only modules inside the scanned packages count. `importlib.import_module("name")` is
no edge: that is how the registries resolve their built-in names on demand.
"""

import ast
import importlib
import subprocess
import sys
from collections import deque
from itertools import pairwise
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prdp_ds", "kernels")


def module_files(root, packages):
    """{dotted module name: path} of every .py file under root/<package> for each package."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking(node):
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute)
        and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree):
    """Every Import / ImportFrom node at any depth, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node))


def _targets(node, package, files):
    """The modules one import statement names (see the module doc)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        anchor = ".".join(parts[: len(parts) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    return [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]


def import_graph(root, packages=PACKAGES):
    """{module: {imported module: 'path:line' of the first import of it}} over the scanned packages."""
    files = module_files(root, packages)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph[name] = {}
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(node, package, files):
                if target in files and target != name:
                    edges.setdefault(target, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def _strongly_connected(graph):
    """Tarjan's algorithm: the strongly connected components of graph, as sets."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph, component):
    """A shortest cycle through the component's first module: [m0, m1, ..., m0]."""
    start = min(component)
    parent, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(set(graph[v]) & component):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)


def find_cycles(graph):
    """One shortest cycle per strongly connected component of more than one module."""
    return [_shortest_cycle(graph, c) for c in _strongly_connected(graph) if len(c) > 1]


def describe(graph, cycle):
    """'a -> b -> a' and, one per line, where each import of the chain is."""
    lines = [" -> ".join(cycle)]
    lines += [f"    {graph[a][b]}  {a} imports {b}" for a, b in pairwise(cycle)]
    return "\n".join(lines)


def test_no_import_cycles():
    graph = import_graph(REPO)
    assert {"prdp_ds.train", "prdp_ds.world.rewards", "kernels", "kernels.utils"} <= graph.keys(), sorted(graph)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_kernels_imports_only_torch_triton_and_itself():
    graph = import_graph(REPO)
    to_prdp = [
        f"{graph[m][t]}  {m} imports {t}"
        for m in graph
        if m.startswith("kernels")
        for t in graph[m]
        if not t.startswith("kernels")
    ]
    assert not to_prdp, "kernels/ must not import prdp_ds:\n" + "\n".join(to_prdp)
    roots = set()
    for path in module_files(REPO, ("kernels",)).values():
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            roots.update(n.partition(".")[0] for n in names if not getattr(node, "level", 0))
    assert roots - set(sys.stdlib_module_names) <= {"torch", "triton", "kernels"}, sorted(roots)


SYNTHETIC = {
    "two_cycle": ({"a.py": "import pkg.b\n", "b.py": "from pkg.a import x\n"}, [{"pkg.a", "pkg.b"}]),
    "three_cycle_function_local": (
        {
            "a.py": "from pkg.b import f\n",
            "b.py": "from .c import g\n",
            "c.py": "def g():\n    from pkg.a import f\n    return f\n",
        },
        [{"pkg.a", "pkg.b", "pkg.c"}],
    ),
    "from_package_import_submodule": (
        {"a.py": "from pkg import b\n", "b.py": "from pkg import a\n"},
        [{"pkg.a", "pkg.b"}],
    ),
    "init_reexports_a_module_that_imports_the_package": (
        {"__init__.py": "from pkg.a import x\n", "a.py": "from pkg import b\nx = 1\n"},
        [{"pkg", "pkg.a"}],
    ),
    "acyclic": (
        {
            "__init__.py": "from pkg.a import x\n",
            "a.py": "import pkg.b\nx = 1\n",
            "b.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n",
            "c.py": "import importlib\nimportlib.import_module('pkg.c')\nfrom pkg import a\n",
        },
        [],
    ),
}


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_cycle_finder_on_synthetic_packages(tmp_path, case):
    files, expected = SYNTHETIC[case]
    (tmp_path / "pkg").mkdir()
    for name, source in {"__init__.py": "", "b.py": "", **files}.items():
        (tmp_path / "pkg" / name).write_text(source)
    graph = import_graph(tmp_path, ("pkg",))
    cycles = find_cycles(graph)
    assert [set(c) for c in cycles] == expected
    for cycle in cycles:
        assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in pairwise(cycle))
        assert describe(graph, cycle).startswith(" -> ".join(cycle))


def test_every_builtin_name_resolves():
    """The registries' "module:attribute" tables name existing callables (imported only on use)."""
    from prdp_ds import models, prompts, rewards

    for table in (models.MODEL_FAMILIES, prompts.BUILTIN_PROMPT_SETS, rewards.BUILTIN_REWARDS):
        for name, path in table.items():
            module, _, attr = path.partition(":")
            assert callable(getattr(importlib.import_module(module), attr, None)), (name, path)


def test_trainer_and_evaluator_do_not_import_the_world():
    """A non-world config runs without prdp_ds.world; its names still resolve on demand."""
    code = (
        "import sys, prdp_ds.train, prdp_ds.evaluate\n"
        "from prdp_ds.prompts import load_prompts, prompt_set_names\n"
        "from prdp_ds.rewards import available_rewards\n"
        "print('prdp_ds.world' in sys.modules)\n"
        "assert {'world_small', 'world_unseen'} <= set(prompt_set_names())\n"
        "assert {'world_alignment', 'world_judge', 'hpsv2'} <= set(available_rewards())\n"
        "load_prompts('world_small')\n"
        "print('prdp_ds.world.scenes' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]
