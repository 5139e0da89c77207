"""Old module paths of the flat layout, kept importable while rsparse/runtime (rewritten apart)
and its tests still use them: `import rsparse.layer` gives rsparse.core.layer, and so on.
Nothing else in the package uses these names; delete an entry once nothing imports it."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "rsparse.budget": "rsparse.core.budget",
    "rsparse.calibrate": "rsparse.core.calibrate",
    "rsparse.data": "rsparse.core.data",
    "rsparse.layer": "rsparse.core.layer",
    "rsparse.models": "rsparse.core.models",
    "rsparse.perplexity": "rsparse.eval.perplexity",
    "rsparse.report": "rsparse.io.results",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # the module is the already imported new one
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
