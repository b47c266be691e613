"""Methods by name: the built-in ones, and a user's own file.

A method (``base.Method``) binds an objective, an image optimiser and an extractor schedule with
the config settings that define it. The config field ``method`` names one:

- a built-in name (``METHODS``): ``idm`` (the default), ``dm``, ``m3d``, ``ncfm``, ``iid``;
- ``path/to/file.py:NAME``: the ``Method`` called ``NAME`` in that Python file, which is loaded
  from outside the package (``path/to/file.py`` alone takes ``METHOD``).

``with_method(config, spec)`` puts a method's settings over a config (a preset); ``get(spec)``
returns the method; ``provenance(spec)`` is what a run records of it (for a file: its absolute
path and the SHA-256 of its source), so that resuming with a changed file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os

from idm_jax.base import Method
from idm_jax.methods import dm, idm, iid, m3d, ncfm

METHODS: dict[str, Method] = {m.name: m for m in (idm.METHOD, dm.METHOD, m3d.METHOD,
                                                   ncfm.METHOD, iid.METHOD)}

_LOADED: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available by its name (a plug-in imported before the run)."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes an idm_jax.base.Method, got {type(method).__name__}")
    METHODS[method.name] = method
    return method


def _split_spec(spec: str) -> tuple[str, str]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):      # "file.py" alone, or a Windows-free name
        return spec, "METHOD"
    return path, name or "METHOD"


def is_file(spec: str) -> bool:
    return _split_spec(spec)[0].endswith(".py")


def _source_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_file(path: str, name: str = "METHOD") -> Method:
    """The ``Method`` called ``name`` in the Python file ``path`` (loaded once per content)."""
    if not os.path.isfile(path):
        raise ValueError(f"--method {path}:{name}: there is no file {path}")
    key = (os.path.abspath(path), _source_hash(path))
    if key not in _LOADED:
        module_name = f"idm_jax_user_method_{key[1][:16]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:      # the user's code: say where, keep the cause
            raise ValueError(f"--method {path}: loading the file failed: "
                             f"{type(err).__name__}: {err}") from err
        _LOADED[key] = module
    method = getattr(_LOADED[key], name, None)
    if not isinstance(method, Method):
        raise ValueError(f"--method {path}:{name}: the file defines no idm_jax.base.Method "
                         f"called {name}")
    return method


def get(spec: str) -> Method:
    """The method ``spec`` names: a built-in name or ``path.py[:NAME]``."""
    if is_file(spec):
        return load_file(*_split_spec(spec))
    if spec not in METHODS:
        raise ValueError(f"--method {spec!r} is not a known method; valid: "
                         f"{', '.join(METHODS)}, or path/to/file.py:NAME for your own")
    return METHODS[spec]


def provenance(spec: str) -> dict:
    """What a run records of its method besides the name: for a file, its absolute path and the
    SHA-256 of its source; nothing for a built-in (the package's version covers it)."""
    if not is_file(spec):
        return {}
    path = _split_spec(spec)[0]
    return {"method_file": os.path.abspath(path), "method_sha256": _source_hash(path)}


def with_method(config, spec: str):
    """``config`` with the method ``spec`` chosen and its defining settings applied."""
    method = get(spec)
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(method.defaults) - fields)
    if unknown:
        raise ValueError(f"--method {spec}: its defaults name unknown config fields {unknown}")
    return dataclasses.replace(config, method=spec, **dict(method.defaults))


__all__ = ["METHODS", "register", "is_file", "load_file", "get", "provenance", "with_method"]
