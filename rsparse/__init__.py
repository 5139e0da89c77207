"""rsparse: training-free rank-aware activation sparsity (R-Sparse, ICLR 2025) for LLM decoding.

The public API (see README "Python API"); everything else lives in the subpackages:
rsparse.core (budgets, the layer, configs, calibration, models, data), rsparse.methods,
rsparse.eval, rsparse.search, rsparse.analysis, rsparse.io, rsparse.runtime and rsparse.cli.
"""

from rsparse import _moved

_moved.install()  # old flat module paths (rsparse.layer, ...) for rsparse/runtime while it moves over

from rsparse.core.calibrate import collect_activations  # noqa: E402
from rsparse.core.config import CatsConfig, GriffinConfig, ReluConfig, RSparseConfig  # noqa: E402
from rsparse.core.data import load_windows  # noqa: E402
from rsparse.core.models import load_model  # noqa: E402
from rsparse.core.sparse_modules import token_mode  # noqa: E402
from rsparse.errors import RsparseError  # noqa: E402
from rsparse.eval.harness import evaluate_tasks  # noqa: E402
from rsparse.eval.perplexity import evaluate_perplexity  # noqa: E402
from rsparse.io.checkpoint import load as load_checkpoint  # noqa: E402
from rsparse.io.checkpoint import save as save_checkpoint  # noqa: E402
from rsparse.methods import restore_, sparsify_  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "sparsify_", "restore_", "RSparseConfig", "CatsConfig", "GriffinConfig", "ReluConfig",
    "load_model", "load_windows", "collect_activations", "evaluate_perplexity", "evaluate_tasks",
    "token_mode", "save_checkpoint", "load_checkpoint", "RsparseError",
]
