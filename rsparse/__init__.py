"""rsparse: training-free rank-aware activation sparsity (R-Sparse, ICLR 2025) for LLM decoding.

The public API (see README "Python API"); everything else lives in the subpackages:
rsparse.core (budgets, the layer, configs, calibration, models, data), rsparse.methods,
rsparse.eval, rsparse.search, rsparse.analysis, rsparse.io, rsparse.runtime and rsparse.cli.

`import rsparse` loads neither torch nor transformers (the command line answers --help in a
fraction of a second): each public name is imported on first use (PEP 562). Importing rsparse
still registers quant_method "rsparse" with transformers (rsparse.io.transformers_format), as
soon as transformers loads its quantizers, so `AutoModelForCausalLM.from_pretrained` reads a
directory `rsparse.save_pretrained` wrote, whichever of the two was imported first.
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
    "save_pretrained": ("rsparse.io.transformers_format", "save_pretrained"),
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


# -- registering quant_method "rsparse" with transformers --------------------------------------------
_REGISTERS = "rsparse.io.transformers_format"  # registers at import
_QUANTIZERS = "transformers.quantizers"  # what it registers with


class _RegisterAfterQuantizers:
    """A one-shot import hook (on sys.meta_path): the spec of transformers.quantizers comes from
    the finders after this one, with a loader that imports rsparse.io.transformers_format right
    after the package has run. Registering then, not in `import rsparse`, spares the command line
    and a plain `import rsparse` the seconds transformers and torch take to import."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _QUANTIZERS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _RegisterAfterLoading(spec.loader, self)
                    return spec
        return None


class _RegisterAfterLoading:
    """The loader of transformers.quantizers, and then the registration (and the hook removed)."""

    def __init__(self, loader, hook: _RegisterAfterQuantizers):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)
        importlib.import_module(_REGISTERS)

    def __getattr__(self, name: str):  # get_source, is_package, resource readers: the real loader's
        return getattr(self.loader, name)


if _QUANTIZERS in sys.modules:
    importlib.import_module(_REGISTERS)
else:
    sys.meta_path.insert(0, _RegisterAfterQuantizers())
