"""Old module paths of the flat layout, kept importable while rsparse/runtime (rewritten apart)
and its tests still use them: `from rsparse.layer import set_token_mode` finds the name in the
modules the old one was split into, in order. Nothing else in the package uses these paths;
delete an entry once nothing imports it."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    "rsparse.budget": ("rsparse.core.budget",),
    "rsparse.calibrate": ("rsparse.core.calibrate", "rsparse.core.factors", "rsparse.methods"),
    "rsparse.checkpoint": ("rsparse.io.checkpoint", "rsparse.io.manifest", "rsparse.errors"),
    "rsparse.config": ("rsparse.core.config", "rsparse.errors"),
    "rsparse.data": ("rsparse.core.data",),
    "rsparse.layer": ("rsparse.core.layer", "rsparse.core.sparse_modules"),
    "rsparse.models": ("rsparse.core.models", "rsparse.errors"),
    "rsparse.perplexity": ("rsparse.eval.perplexity",),
    "rsparse.report": ("rsparse.io.results",),
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = types.ModuleType(spec.name, f"moved to {', '.join(MOVED[spec.name])}")
        sources = [importlib.import_module(m) for m in MOVED[spec.name]]

        def __getattr__(attr):
            for source in sources:
                if hasattr(source, attr):
                    return getattr(source, attr)
            raise AttributeError(f"module {spec.name!r} (moved to {', '.join(MOVED[spec.name])}) has no {attr!r}")

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
