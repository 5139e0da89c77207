"""rsparse: training-free rank-aware activation sparsity (R-Sparse, ICLR 2025) for LLM decoding.

The public API (see README "Python API"); everything else lives in the subpackages:
rsparse.core (budgets, the layer, configs, calibration, models, data), rsparse.methods,
rsparse.eval, rsparse.search, rsparse.analysis, rsparse.io, rsparse.runtime and rsparse.cli.

`import rsparse` loads neither torch nor transformers (the command line answers --help in a
fraction of a second): each public name is imported on first use (PEP 562). Importing rsparse
still registers model_type "rsparse" with transformers' AutoConfig (rsparse.io.hf_config) and
quant_method "rsparse" with its quantizers (rsparse.io.transformers_format), each as soon as
transformers loads that part, so `AutoModelForCausalLM.from_pretrained` reads a directory
`rsparse.save_pretrained` wrote, whichever of the two was imported first.
"""

import importlib
import sys

__version__ = "0.1.0"

# public name -> (module, name there), imported on first use
_API = {
    "sparsify_": ("rsparse.methods", "sparsify_"),
    "restore_": ("rsparse.methods", "restore_"),
    "RSparseConfig": ("rsparse.core.config", "RSparseConfig"),
    "CatsConfig": ("rsparse.core.config", "CatsConfig"),
    "GriffinConfig": ("rsparse.core.config", "GriffinConfig"),
    "ReluConfig": ("rsparse.core.config", "ReluConfig"),
    "load_model": ("rsparse.core.models", "load_model"),
    "load_windows": ("rsparse.core.data", "load_windows"),
    "collect_activations": ("rsparse.core.calibrate", "collect_activations"),
    "evaluate_perplexity": ("rsparse.eval.perplexity", "evaluate_perplexity"),
    "evaluate_tasks": ("rsparse.eval.harness", "evaluate_tasks"),
    "token_mode": ("rsparse.core.sparse_modules", "token_mode"),
    "save_pretrained": ("rsparse.io.checkpoint", "save_pretrained"),
    "load_checkpoint": ("rsparse.io.checkpoint", "load_any"),
    "RsparseError": ("rsparse.errors", "RsparseError"),
}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'rsparse' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # next time a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# -- registering model_type and quant_method "rsparse" with transformers ----------------------------
# transformers module -> the rsparse module that registers with it when imported
_REGISTRATIONS = {"transformers.models.auto.configuration_auto": "rsparse.io.hf_config",
                  "transformers.quantizers": "rsparse.io.transformers_format"}


class _RegisterAfterImport:
    """A one-shot import hook (on sys.meta_path): the spec of each module of _REGISTRATIONS comes
    from the finders after this one, with a loader that imports the registering rsparse module right
    after that module has run. Registering then, not in `import rsparse`, spares the command line
    and a plain `import rsparse` the seconds transformers and torch take to import."""

    def __init__(self, pending: dict[str, str]):
        self.pending = dict(pending)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _RegisterAfterLoading(spec.loader, self, self.pending[fullname])
                    return spec
        return None

    def done(self, fullname: str) -> None:
        self.pending.pop(fullname, None)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


class _RegisterAfterLoading:
    """The real loader of a transformers module, and then the registration."""

    def __init__(self, loader, hook: _RegisterAfterImport, registers: str):
        self.loader, self.hook, self.registers = loader, hook, registers

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.hook.done(module.__name__)
        importlib.import_module(self.registers)

    def __getattr__(self, name: str):  # get_source, is_package, resource readers: the real loader's
        return getattr(self.loader, name)


_waiting = {}
for _module, _registers in _REGISTRATIONS.items():
    if _module in sys.modules:
        importlib.import_module(_registers)
    else:
        _waiting[_module] = _registers
if _waiting:
    sys.meta_path.insert(0, _RegisterAfterImport(_waiting))
