"""The installable package: entry points resolve, every subpackage ships, the API is plain."""

import ast
import importlib
import inspect
import os
import tomllib
import types

import idm_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_console_entry_points_name_callables():
    scripts = pyproject()["project"]["scripts"]
    assert set(scripts) == {"idm-condense", "idm-evaluate", "idm-report"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_idm_condense_help_exits_zero(capsys):
    # A console script exits with the entry function's return value: it must be None (0), or
    # sys.exit prints it and exits 1.
    from idm_jax.runs import cli
    assert cli.condense_main(["--dataset", "digits", "--help"]) is None
    out = capsys.readouterr().out
    assert "idm-condense" in out and "--dataset NAME" in out


def test_every_subpackage_is_included_by_the_package_finder():
    from setuptools import find_packages
    found = set(find_packages(ROOT, **pyproject()["tool"]["setuptools"]["packages"]["find"]))
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "idm_jax"))
               if "__init__.py" in files}
    assert on_disk and on_disk == found


def test_entry_functions_are_plain_functions_next_to_their_modules():
    # No callable-module trick: condense and evaluate are functions with real signatures,
    # and the modules they live in are ordinary modules.
    for fn, module in ((idm_jax.condense, idm_jax.iterating),
                       (idm_jax.evaluate, idm_jax.evaluation),
                       (idm_jax.condense_and_evaluate,
                        importlib.import_module("idm_jax.runs.run"))):
        assert inspect.isfunction(fn)
        assert type(module) is types.ModuleType
        assert fn.__module__ == module.__name__
    assert "train_images" in inspect.signature(idm_jax.condense).parameters
    for name in idm_jax.__all__:
        assert hasattr(idm_jax, name), name


def test_sharding_never_imports_the_engine():
    # The mesh code is generic: it must not import the engine, its state types or the trainer.
    with open(os.path.join(ROOT, "idm_jax", "accel", "sharding.py")) as f:
        tree = ast.parse(f.read())
    imported = [node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names]
    assert "jax" in imported
    assert not [name for name in imported if name and name.startswith("idm_jax")], imported


def _package_imports():
    """module -> the idm_jax modules it imports (every import statement, TYPE_CHECKING too)."""
    package = os.path.join(ROOT, "idm_jax")
    modules = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:       # "from idm_jax import x": module idm_jax.x
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[module] = {m for m in edges if m in modules and m != module}
    return graph


def test_no_import_cycle_in_the_package_and_base_is_a_leaf():
    graph = _package_imports()
    assert graph["idm_jax.base"] == set()
    # The layers: nothing but the runs themselves (and the package's re-exports) uses runs/.
    users = {m for m, deps in graph.items() for d in deps if d.startswith("idm_jax.runs")}
    assert {m for m in users if not m.startswith("idm_jax.runs")} <= {"idm_jax"}, users
    # The package's own __init__ re-exports; everything else must form a DAG without it.
    graph = {m: {d for d in deps if d != "idm_jax"} for m, deps in graph.items()}
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(trail + [module, dep])}")
            if dep not in state:
                visit(dep, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
