"""`rsparse convert`: the older checkpoint format (an `rsparse.json` directory, rsparse <= 0.1) to
the one format rsparse reads, the transformers directory (rsparse.io.checkpoint).

Nothing else in rsparse knows the older format: loaders ask `is_legacy(path)` and refuse such a
directory with `legacy_error(path)`, one line that names the command. The conversion checks what
the old loader checked (manifest, file sizes and sha256, the layer list against the tensors and
the model config), builds the model with its R-Sparse layers and copies every tensor in;
`rsparse convert` then writes it with `save_pretrained`: the converted directory gives the same
logits bit for bit.

    rsparse convert OLD_DIR NEW_DIR
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rsparse.errors import CheckpointError, CheckpointFileMissing
from rsparse.io.hf_checks import layer_tensor_shapes
from rsparse.io.integrity import sha256_file

MANIFEST = "rsparse.json"
FORMAT_NAME = "rsparse-checkpoint"
WEIGHTS = "model.safetensors"


def is_legacy(path) -> bool:
    """True for a directory in the older format (it has rsparse.json)."""
    try:
        return path is not None and (Path(path) / MANIFEST).is_file()
    except (TypeError, OSError):
        return False


def legacy_error(path) -> CheckpointError:
    return CheckpointError(f"{path} is an rsparse checkpoint in the older rsparse.json format, which this rsparse no "
                           f"longer loads: convert it once with `rsparse convert {path} NEW_DIR` and use NEW_DIR")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}): copy the checkpoint again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != 1:
        raise CheckpointError(f"{path} is not an rsparse.json manifest of format version 1")
    for key, kind in (("layers", list), ("files", dict), ("tied", dict), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    for i, entry in enumerate(manifest["layers"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("rank"), int)
              and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2)
        if not ok:
            raise CheckpointError(f"{path}: layer entry {i} is malformed: {entry!r}")
    return manifest


def _check_files(directory: Path, manifest: dict) -> dict[str, list[int]]:
    """Every listed file present, unmodified (sha256) and readable; returns {tensor: shape}."""
    from safetensors import SafetensorError, safe_open

    for name in ["config.json", *manifest.get("other_files", []), *manifest["files"]]:
        if not (directory / name).is_file():
            raise CheckpointFileMissing(f"checkpoint {directory} is incomplete: {name} is missing")
    for name, digest in {**manifest.get("other_sha256", {}),
                         **{n: i.get("sha256") for n, i in manifest["files"].items()}}.items():
        if sha256_file(directory / name) != digest:
            raise CheckpointError(f"{directory / name} does not match its sha256 in {MANIFEST}: it is corrupted or "
                                  "was modified; copy the original checkpoint again")
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"{directory / MANIFEST}: 'files' does not list {WEIGHTS}")
    try:
        with safe_open(str(directory / WEIGHTS), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / WEIGHTS} is not a readable safetensors file ({e})") from None


def _empty_layer(linear: nn.Linear, entry: dict, dtype: torch.dtype) -> nn.Module:
    """An RSparseLinear of the entry's shapes, its tensors allocated, to be filled by copy_."""
    from rsparse.core.layer import RSparseLinear

    out_f, in_f = linear.out_features, linear.in_features
    layer = RSparseLinear(in_f, out_f, rank=entry["rank"], bias=linear.bias is not None, device="meta",
                          dtype=dtype, name=entry["name"])
    layer.weight = nn.Parameter(torch.empty(in_f, out_f, dtype=dtype).t(), requires_grad=False)  # column-major
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty(out_f, dtype=dtype), requires_grad=False)
    layer.threshold = torch.empty((), dtype=torch.float32)
    layer.score_scale = torch.empty(in_f, dtype=torch.float32)
    layer.lr_down = torch.empty(in_f, entry["rank"], dtype=dtype)
    layer.lr_up = torch.empty(entry["rank"], out_f, dtype=dtype)
    layer.method, layer.tokens = entry["method"], entry["tokens"]
    layer.keep_fraction = float(entry.get("keep_fraction", 1.0))
    return layer


@torch.no_grad()
def read_legacy(directory) -> tuple[nn.Module, object, dict | None, list | None]:
    """(model, tokenizer, rsparse config dict, sparsify_ report) of an older-format checkpoint,
    every file checked first; `rsparse.save_pretrained(model, tokenizer, DIR, config=..., report=...)`
    writes it in the current format."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    from rsparse.core.models import replace_module

    directory = Path(directory)
    if not is_legacy(directory):
        raise CheckpointFileMissing(f"{directory} is not an rsparse.json checkpoint: {MANIFEST} is missing")
    manifest = _read_manifest(directory)
    stored = _check_files(directory, manifest)
    dtype = getattr(torch, str(manifest["model"].get("dtype") or "float32"))
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory / 'config.json'} cannot be read as a model config: {e}") from None
    with no_init_weights():  # every tensor is copied in below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    modules = dict(model.named_modules())
    for entry in manifest["layers"]:
        linear = modules.get(entry["name"])
        if not isinstance(linear, nn.Linear) or [linear.out_features, linear.in_features] != entry["shape"]:
            raise CheckpointError(f"layer {entry['name']} of {MANIFEST} is not a linear layer of shape {entry['shape']} "
                                  "in the model config.json describes: the layer list does not match the config")
        for suffix, shape in layer_tensor_shapes({**entry, "bias": linear.bias is not None}).items():
            if stored.get(f"{entry['name']}.{suffix}") != shape:
                raise CheckpointError(f"tensor {entry['name']}.{suffix} is missing or not of shape {shape} in {WEIGHTS}")
        replace_module(model, entry["name"], _empty_layer(linear, entry, dtype))
    state = model.state_dict(keep_vars=True)
    tied = manifest["tied"]
    missing = [k for k in state if k not in stored and k not in tied]
    unexpected = [k for k in stored if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"the tensors of {WEIGHTS} do not match the model config.json describes: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        for key in stored:
            if list(state[key].shape) != stored[key]:
                raise CheckpointError(f"tensor {key} has shape {stored[key]} in {WEIGHTS} but "
                                      f"{list(state[key].shape)} in the model config.json describes")
            state[key].copy_(f.get_tensor(key))
    for alias, key in tied.items():
        if state[alias] is not state[key]:
            state[alias].copy_(state[key])
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    tokenizer = None
    if manifest.get("tokenizer", True):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    report = manifest.get("report")
    if not (isinstance(report, list) and all(isinstance(r, dict) and {"shape", "read_fraction"} <= r.keys()
                                             for r in report)):
        report = None  # the summary's calibrated read fraction is left out rather than guessed
    return model, tokenizer, manifest.get("rsparse_config"), report
