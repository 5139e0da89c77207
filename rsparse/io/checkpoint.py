"""Sparsified models on disk: one format, a standard transformers directory (safetensors + JSON,
never pickle) whose config.json carries the rsparse `quantization_config`
(rsparse.io.transformers_format; docs/checkpoint-format.md).

    rsparse.save_pretrained(model, tok, "out/m")     # what `rsparse compress` writes
    model, tok = rsparse.load_checkpoint("out/m")    # checked, then AutoModelForCausalLM.from_pretrained

`save_pretrained` writes into a temporary directory beside the target and renames it into place,
so a failed save leaves whatever was there before. `load` checks the files (hashes, shard headers,
layer list against the model config) before any tensor is read, and gives the same logits bit for
bit as the saved model on the same device and dtype. `load_any` loads such a directory or
anything rsparse.core.models.load_model accepts. A directory of the older rsparse.json format is
refused with one line that names `rsparse convert` (rsparse.io.convert).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from rsparse.errors import CheckpointError
from rsparse.io import convert, integrity
from rsparse.io.hf_checks import CONFIG, TransformersFormatError, TransformersFormatFileMissing, verify_hashes
from rsparse.io.model_card import model_card
from rsparse.io.outdir import staged_replacement
from rsparse.io.results import json_safe
from rsparse.io.transformers_format import QUANT_METHOD, RSparseHfQuantizer, attach

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype or its name ("bfloat16", "torch.float16", "bf16") as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


# -- what a directory is --------------------------------------------------------------------------
def read_quantization_config(directory) -> dict | None:
    """The rsparse quantization_config dict of a directory's config.json, or None if it has none."""
    try:
        path = Path(directory) / CONFIG
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def is_checkpoint(path) -> bool:
    """True if `path` is an rsparse model directory (config.json names quant_method "rsparse")."""
    try:
        return path is not None and Path(path).is_dir() and read_quantization_config(path) is not None
    except (TypeError, OSError):
        return False


def weight_files(directory) -> list[Path]:
    """The safetensors files of a directory (the shards its index lists, or model.safetensors);
    raises TransformersFormatFileMissing for a missing one."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TransformersFormatError(f"{index} is not a valid shard index ({e}): save the model again") from None
    else:
        files = [WEIGHTS]
    for name in files:
        if not (directory / name).is_file():
            raise TransformersFormatFileMissing(f"{directory} is incomplete: weight shard {name} is missing; copy the "
                                                "whole directory again")
    return [directory / name for name in files]


# -- save -----------------------------------------------------------------------------------------
def check_target(directory, overwrite: bool) -> Path:
    """Refuse targets that would lose user data; returns the absolute target path."""
    target = Path(os.path.abspath(directory))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    cwd = Path.cwd().resolve()
    real = target.resolve()
    if real == cwd or real in cwd.parents or real == real.parent:
        raise CheckpointError(f"refusing to save into {target}: it is the working directory or one of its parents; "
                              "name a new directory")
    if target.is_dir() and any(target.iterdir()) and not is_checkpoint(target) and not overwrite:
        raise CheckpointError(f"refusing to save into {target}: the directory is not empty and is not an rsparse "
                              "model directory; choose another directory or pass overwrite=True (--overwrite) to "
                              "replace it")
    return target


def save_pretrained(model: nn.Module, tokenizer, directory, *, config=None, report: list[dict] | None = None,
                    perplexity: dict | None = None, source: str | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write a sparsified model as a transformers directory: shards, config.json with the rsparse
    quantization_config, generation config, tokenizer files and a model card (README.md).

    config / report: the RSparseConfig and report of sparsify_ (already attached by sparsify_;
    given here they replace the recipe summary). perplexity: {"ppl", "corpus", "windows",
    "seq_len", "tokens", ...} for the model card. The write is atomic: everything goes to a
    temporary directory beside the target, which is renamed into place. An existing rsparse
    directory is replaced; another non-empty directory needs overwrite=True.
    """
    target = check_target(Path(directory), overwrite)
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise TransformersFormatError("save_pretrained expects a transformers causal LM")
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, RSparseHfQuantizer):
        raise TransformersFormatError("the model is quantized with another method "
                                      f"({current.quantization_config.quant_method}); rsparse saves float weights")
    qc = attach(model, config=config, report=report)
    if perplexity is not None:
        qc.summary["perplexity"] = json_safe(dict(perplexity))
    if source:
        qc.summary["source"] = str(source)
    with staged_replacement(target) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)  # config.json: model_type "rsparse"
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODEL_CARD).write_text(model_card(model, qc, target.name), encoding="utf-8")
        integrity.record(tmp)  # hashes of config.json and the tokenizer files: any edit is refused on load
    return target


# -- load -----------------------------------------------------------------------------------------
def load(directory, device: str | torch.device = "cpu", dtype=None, verify: bool = True):
    """Load an rsparse model directory; returns (model, tokenizer or None).

    The same as `AutoModelForCausalLM.from_pretrained(directory, dtype=..., device_map=...)` after
    `import rsparse`, with the files checked first, so that every problem (missing shard included)
    is a TransformersFormatError (a CheckpointError). dtype None: as saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise TransformersFormatFileMissing(f"model directory not found: {directory}")
    if convert.is_legacy(directory):
        raise convert.legacy_error(directory)
    if read_quantization_config(directory) is None:
        raise TransformersFormatError(f"{directory} is not an rsparse model directory: {CONFIG} has no "
                                      f"quantization_config with quant_method {QUANT_METHOD!r}")
    integrity.verify(directory)
    weight_files(directory)
    device_map = {"": str(device)} if str(device) != "meta" else None
    try:
        with verify_hashes(verify), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=parse_dtype(dtype) or "auto",
                                                         device_map=device_map, local_files_only=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise TransformersFormatError(f"{directory} cannot be loaded: {type(e).__name__}: {e}") from None
    model.eval()
    model.name_or_path = str(directory)
    tokenizer = None
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_any(name_or_dir=None, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """An rsparse model directory (`load`), or anything rsparse.core.models.load_model accepts
    (None: the embedded model; a .gguf file, a Hugging Face directory or hub id). A directory of
    the older rsparse.json format is refused with the command that converts it."""
    if convert.is_legacy(name_or_dir):
        raise convert.legacy_error(name_or_dir)
    if is_checkpoint(name_or_dir):
        return load(name_or_dir, device=device, dtype=dtype)
    from rsparse.core.models import load_model

    return load_model(name_or_dir, dtype=parse_dtype(dtype) or torch.float32, device=device)
