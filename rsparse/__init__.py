"""rsparse: training-free rank-aware activation sparsity (R-Sparse, ICLR 2025) for LLM decoding."""

from rsparse.baselines import apply_cats_, apply_griffin_, apply_relu_, restore_baselines_
from rsparse.budget import LayerBudget, layer_budget, model_read_fraction
from rsparse.checkpoint import CheckpointError, load_any
from rsparse.checkpoint import load as load_checkpoint
from rsparse.checkpoint import save as save_checkpoint
from rsparse.calibrate import CalibrationActivations, collect_activations, restore_, sparsify_
from rsparse.config import RecipeError, RSparseConfig, load_recipe
from rsparse.data import load_windows
from rsparse.evaluate import apply_method, evaluate_tasks, restore_all
from rsparse.layer import RSparseLinear, rsparse_layers, set_token_mode
from rsparse.models import UnsupportedModelError, decoder_linears, load_model
from rsparse.perplexity import evaluate_perplexity
from rsparse.io.transformers_format import save_pretrained  # registers quant_method "rsparse" with transformers

__version__ = "0.1.0"

__all__ = [
    "apply_cats_", "apply_griffin_", "apply_method", "apply_relu_", "evaluate_tasks", "restore_all",
    "restore_baselines_",
    "CalibrationActivations", "CheckpointError", "load_any", "load_checkpoint", "save_checkpoint", "LayerBudget", "RSparseConfig", "RSparseLinear", "RecipeError",
    "UnsupportedModelError", "collect_activations", "decoder_linears", "evaluate_perplexity",
    "layer_budget", "load_model", "load_recipe", "load_windows", "model_read_fraction", "restore_",
    "rsparse_layers", "save_pretrained", "set_token_mode", "sparsify_",
]
