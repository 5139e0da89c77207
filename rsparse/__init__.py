"""rsparse: training-free rank-aware activation sparsity (R-Sparse, ICLR 2025) for LLM decoding.

The public API (see README "Python API"); everything else lives in the subpackages:
rsparse.core (budgets, the layer, configs, calibration, models, data), rsparse.methods,
rsparse.eval, rsparse.search, rsparse.analysis, rsparse.io, rsparse.runtime and rsparse.cli.
"""

from rsparse.core.calibrate import collect_activations
from rsparse.core.config import CatsConfig, GriffinConfig, ReluConfig, RSparseConfig
from rsparse.core.data import load_windows
from rsparse.core.models import load_model
from rsparse.core.sparse_modules import token_mode
from rsparse.errors import RsparseError
from rsparse.eval.harness import evaluate_tasks
from rsparse.eval.perplexity import evaluate_perplexity
from rsparse.io.checkpoint import load_any as load_checkpoint
from rsparse.io.checkpoint import save_pretrained  # registers quant_method and model_type "rsparse" with transformers
from rsparse.methods import restore_, sparsify_

__version__ = "0.1.0"

__all__ = [
    "sparsify_", "restore_", "RSparseConfig", "CatsConfig", "GriffinConfig", "ReluConfig",
    "load_model", "load_windows", "collect_activations", "evaluate_perplexity", "evaluate_tasks",
    "token_mode", "save_pretrained", "load_checkpoint", "RsparseError",
]
