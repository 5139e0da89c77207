"""Saving and loading sparsified models: safetensors + JSON, never pickle.

A checkpoint is a directory (see docs/checkpoint-format.md):

    rsparse.json             manifest: format version, versions, model config, R-Sparse layers,
                             RSparseConfig / recipe / report, sha256 of every safetensors file
    model.safetensors        every tensor of model.state_dict(): the dense weights (embedding,
                             norms, lm_head unless tied) and, per R-Sparse layer, weight, lr_down,
                             lr_up, threshold, score_scale (weights stored row-major, contiguous)
    config.json              the Hugging Face model config (AutoModelForCausalLM.from_config)
    generation_config.json   the model's generation defaults (when it has them)
    tokenizer files          tokenizer.save_pretrained

`save` writes into a temporary directory beside the target and renames it into place, so a
failed save leaves whatever was there before. `load` checks everything (files, format version,
hashes, safetensors header, layer list against the model config, tensor names and shapes)
before loading any tensor, and gives the same logits bit for bit as the saved model on the
same device and dtype. `load_any` loads a checkpoint or anything rsparse.core.models.load_model
accepts.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from rsparse.core.layer import RSparseLinear
from rsparse.errors import CheckpointError, CheckpointFileMissing
from rsparse.io.manifest import (FORMAT_NAME, FORMAT_VERSION, GENERATION_CONFIG, HF_CONFIG, MANIFEST, WEIGHTS, _check_files,
                                 _dtype_name, _json_safe, layer_tensor_shapes, _sha256, is_checkpoint, read_manifest)
from rsparse.io.outdir import staged_replacement

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _layer_entries(model: nn.Module) -> list[dict]:
    names = _module_names(model)
    entries = []
    for module in model.modules():
        if isinstance(module, RSparseLinear):
            entries.append({
                "name": names[id(module)], "method": module.method, "tokens": module.tokens,
                "keep_fraction": float(module.keep_fraction), "rank": int(module.rank),
                "shape": [module.out_features, module.in_features], "bias": module.bias is not None,
            })
    return entries


def _state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies of the state dict, and tied keys {alias: stored key} saved once."""
    tensors, tied, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            raise CheckpointError(f"tensor {key} is on the meta device (not loaded); cannot save it")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 value.stride(), value.dtype, str(value.device))
        if value.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    # safetensors refuses tensors sharing memory; copy any that still do (rare views).
    storages = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            tensors[key] = t.clone()
        else:
            storages[ptr] = key
    return tensors, tied


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# -- save ---------------------------------------------------------------------------------
def _check_target(directory: Path, overwrite: bool) -> Path:
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
                              "checkpoint; choose another directory or pass overwrite=True (--overwrite) to replace it")
    return target


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(model: nn.Module, tokenizer, directory, report: list[dict] | None = None, config=None,
         overwrite: bool = False, source: str | None = None) -> Path:
    """Save a (sparsified or dense) model and its tokenizer as an rsparse checkpoint directory.

    report: the list returned by sparsify_ (stored in rsparse.json); config: the RSparseConfig
    (or its dict) used; source: where the model came from (default model.name_or_path).
    An existing rsparse checkpoint at `directory` is replaced; any other non-empty directory is
    refused unless overwrite=True. The write is atomic: a temporary directory beside the target
    is renamed into place only once everything is written.
    """
    from safetensors.torch import save_file

    from rsparse.core.config import RSparseConfig, load_recipe
    from rsparse.io.results import versions

    target = _check_target(Path(directory), overwrite)
    if getattr(model, "config", None) is None:
        raise CheckpointError("model has no Hugging Face config; save expects a transformers causal LM")
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", "rsparse") != "rsparse":
        raise CheckpointError("model config has a quantization_config; rsparse checkpoints store plain float weights "
                              "(load the model with rsparse.core.models.load_model, which dequantises GGUF files)")
    layers = _layer_entries(model)
    tensors, tied = _state_tensors(model)

    config_dict, recipe = None, None
    if config is not None:
        if isinstance(config, RSparseConfig):
            config_dict = config.to_dict()
            recipe = load_recipe(config.recipe) if config.recipe is not None else None
        elif isinstance(config, dict):
            config_dict = dict(config)
        else:
            raise CheckpointError(f"config must be an RSparseConfig or a dict, got {type(config).__name__}")

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "source": source or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
            "dtype": _dtype_name(_model_dtype(model)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": model.config.to_dict(),
        },
        "sparsified": any(l["method"] != "dense" for l in layers),
        "layers": layers,
        "rsparse_config": config_dict,
        "recipe": recipe,
        "report": report,
        "tied": tied,
        "files": {},
        "other_files": [],
    }

    with staged_replacement(target) as tmp:
        model.config.save_pretrained(tmp)
        _drop_quantization_config(tmp / HF_CONFIG)  # legacy format: the layout lives in rsparse.json
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "rsparse_format_version": str(FORMAT_VERSION)})
        _fsync(tmp / WEIGHTS)
        manifest["files"] = {WEIGHTS: {"sha256": _sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size,
                                       "tensors": len(tensors)}}
        manifest["other_files"] = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != WEIGHTS)
        # config.json and the tokenizer files change the model as much as the weights: hash them too
        manifest["other_sha256"] = {n: _sha256(tmp / n) for n in manifest["other_files"]}
        manifest["tokenizer"] = tokenizer is not None
        text = json.dumps(_json_safe(manifest), indent=2, allow_nan=False) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        _fsync(tmp / MANIFEST)
        # the manifest's own hash, beside it (an edited layer list was loaded as if it were saved)
        (tmp / MANIFEST_HASH).write_text(_sha256(tmp / MANIFEST) + "\n", encoding="ascii")
    return target


MANIFEST_HASH = MANIFEST + ".sha256"


def _check_other_files(directory: Path, manifest: dict) -> None:
    """The manifest's own sha256 and those of config.json and the tokenizer files (checkpoints
    written before these were recorded have neither, and load as before)."""
    sidecar = directory / MANIFEST_HASH
    edited = "was edited: save the model again, or copy the original checkpoint"
    if sidecar.is_file() and sidecar.read_text(encoding="ascii", errors="replace").strip() != _sha256(directory / MANIFEST):
        raise CheckpointError(f"{directory / MANIFEST} does not match its recorded sha256 ({MANIFEST_HASH}): the file "
                              f"{edited}")
    recorded = manifest.get("other_sha256")
    for name, digest in (recorded.items() if isinstance(recorded, dict) else ()):
        path = directory / str(name)
        if not path.is_file():
            raise CheckpointFileMissing(f"{path} is missing: copy the whole checkpoint directory again")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its recorded sha256 in {MANIFEST}: the file {edited}")


def _drop_quantization_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- load ---------------------------------------------------------------------------------


def _empty_rsparse(linear: nn.Linear, entry: dict, dtype: torch.dtype) -> RSparseLinear:
    """An RSparseLinear of the right shapes (column-major weight), to be filled by copy_."""
    out_f, in_f = linear.out_features, linear.in_features
    layer = RSparseLinear(in_f, out_f, rank=entry["rank"], bias=linear.bias is not None, device="meta",
                          dtype=dtype, name=entry["name"])
    layer.weight = nn.Parameter(torch.empty(in_f, out_f, dtype=dtype).t(), requires_grad=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty(out_f, dtype=dtype), requires_grad=False)
    layer.threshold = torch.empty((), dtype=torch.float32)
    layer.score_scale = torch.empty(in_f, dtype=torch.float32)
    layer.lr_down = torch.empty(in_f, entry["rank"], dtype=dtype)
    layer.lr_up = torch.empty(entry["rank"], out_f, dtype=dtype)
    layer.method = entry["method"]
    layer.tokens = entry["tokens"]
    layer.keep_fraction = float(entry.get("keep_fraction", 1.0))
    return layer


def _build_model(auto_class, config, dtype: torch.dtype) -> nn.Module:
    """The model the config describes, without spending time on random weights (every stored
    tensor is copied in afterwards; load checks that the files cover the whole state dict)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions: plain (slower) initialisation
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = auto_class.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the initialisation
    return model


@torch.no_grad()
def load(directory, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         verify: bool = True):
    """Load a checkpoint written by `save`; returns (model, tokenizer).

    dtype: None for the dtype the model was saved in. verify: check the sha256 of the tensor
    files (reads them once more). Raises CheckpointError (CheckpointFileMissing for missing
    files), before any tensor is loaded, if the checkpoint is incomplete, modified, inconsistent
    or of a newer format.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rsparse.core.models import replace_module

    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_other_files(directory, manifest)
    file_shapes = _check_files(directory, manifest, verify)
    dtype = _dtype(dtype) or _dtype(manifest["model"].get("dtype") or "float32")
    stored = {k: (file, shape) for file, tensors in file_shapes.items() for k, shape in tensors.items()}
    tied = manifest["tied"]
    for alias, key in tied.items():
        if key not in stored:
            raise CheckpointError(f"{MANIFEST}: tied tensor {alias} points to {key}, which no tensor file holds")

    # The layer list against the stored tensors (cheap, before building the model).
    for entry in manifest["layers"]:
        for tname, shape in layer_tensor_shapes(entry).items():
            key = f"{entry['name']}.{tname}"
            if key not in stored:
                raise CheckpointError(f"layer {entry['name']} of {MANIFEST} has no tensor {key} in the tensor files")
            if stored[key][1] != shape:
                raise CheckpointError(f"tensor {key} has shape {stored[key][1]}, the layer list of {MANIFEST} implies "
                                      f"{shape} (shape {entry['shape']}, rank {entry['rank']})")

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse error of config.json
        raise CheckpointError(f"{directory / HF_CONFIG} cannot be read as a model config: {e}") from None
    model = _build_model(AutoModelForCausalLM, config, dtype)

    # The layer list against the model the config describes.
    modules = dict(model.named_modules())
    for entry in manifest["layers"]:
        linear = modules.get(entry["name"])
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"layer {entry['name']} of {MANIFEST} is not a linear layer of the "
                                  f"{type(model).__name__} that {HF_CONFIG} describes: the layer list does not "
                                  "match the model config")
        if [linear.out_features, linear.in_features] != entry["shape"]:
            raise CheckpointError(f"layer {entry['name']} has shape {entry['shape']} in {MANIFEST} but "
                                  f"[{linear.out_features}, {linear.in_features}] in the model {HF_CONFIG} describes: "
                                  "the layer list does not match the model config")
        if bool(entry.get("bias", linear.bias is not None)) != (linear.bias is not None):
            raise CheckpointError(f"layer {entry['name']}: bias in {MANIFEST} does not match the model config")
    for entry in manifest["layers"]:
        replace_module(model, entry["name"], _empty_rsparse(modules[entry["name"]], entry, dtype))

    # Every tensor of the model is stored once (or is a tied alias), with the same shape.
    state = model.state_dict(keep_vars=True)
    missing = [k for k in state if k not in stored and k not in tied]
    unexpected = [k for k in stored if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"the tensor files do not match the model {HF_CONFIG} describes: "
                              f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    bad = [k for k, (_, shape) in stored.items() if list(state[k].shape) != shape]
    if bad:
        raise CheckpointError(f"tensor {bad[0]} has shape {stored[bad[0]][1]} in the tensor file but "
                              f"{list(state[bad[0]].shape)} in the model {HF_CONFIG} describes")

    by_file: dict[str, list[str]] = {}
    for key, (file, _) in stored.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(directory / file), "pt") as f:
            for key in keys:
                state[key].copy_(f.get_tensor(key))
                for alias in (a for a, k in tied.items() if k == key):
                    if state[alias] is not state[key]:
                        state[alias].copy_(state[key])

    gen_path = directory / GENERATION_CONFIG
    if gen_path.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    model.to(device).eval()
    model.name_or_path = str(directory)
    tokenizer = None
    if manifest.get("tokenizer", True):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_any(name_or_dir=None, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """An rsparse transformers directory (rsparse.io.transformers_format.load), a legacy checkpoint
    (has rsparse.json; read-only, with a deprecation line) via `load`, anything else via
    rsparse.core.models.load_model (None: the embedded model; a .gguf file, a Hugging Face
    directory or hub id)."""
    from rsparse.io import transformers_format as hf_format

    if hf_format.is_rsparse_directory(name_or_dir):
        return hf_format.load(name_or_dir, device=device, dtype=dtype)
    if is_checkpoint(name_or_dir):
        hf_format.legacy_notice(name_or_dir)
        model, tokenizer = load(name_or_dir, device=device, dtype=dtype)
        hf_format.attach(model, config=read_manifest(name_or_dir).get("rsparse_config"))  # save_pretrained converts
        return model, tokenizer
    from rsparse.core.models import load_model

    return load_model(name_or_dir, dtype=_dtype(dtype) or torch.float32, device=device)
