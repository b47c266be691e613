"""Let a module be called like its main function.

The public API names ``idm_jax.condense(...)`` and ``idm_jax.evaluate(...)`` as functions while
the modules ``idm_jax/condense.py`` and ``idm_jax/evaluate.py`` hold them. A plain re-export
would shadow the module (``from idm_jax import condense`` would return the function); making the
module callable keeps both meanings: ``idm_jax.condense.make_step`` and ``idm_jax.condense(cfg, ...)``.
"""

import sys
import types


def make_module_callable(module_name: str, function) -> None:
    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
