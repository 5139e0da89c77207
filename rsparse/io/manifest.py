"""The checkpoint manifest (rsparse.json) and the checks run on a checkpoint directory before
any tensor is read: format and version, the layer list, file sizes, sha256 hashes and the
safetensors headers. The format: docs/checkpoint-format.md."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from rsparse.core.layer import LAYER_METHODS, TOKEN_MODES
from rsparse.errors import CheckpointError, CheckpointFileMissing

FORMAT_NAME = "rsparse-checkpoint"
FORMAT_VERSION = 1  # the newest format this rsparse reads and the one it writes
MANIFEST = "rsparse.json"
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(value):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return str(value)


def is_checkpoint(path) -> bool:
    """True if `path` is a sparsified-model directory: a transformers directory with quant_method
    "rsparse" (rsparse.io.transformers_format), or a legacy checkpoint (rsparse.json)."""
    from rsparse.io.transformers_format import is_rsparse_directory

    try:
        return path is not None and Path(path).is_dir() and ((Path(path) / MANIFEST).is_file()
                                                             or is_rsparse_directory(path))
    except (TypeError, OSError):
        return False


def read_manifest(directory) -> dict:
    """The parsed and checked rsparse.json of a checkpoint directory (no tensors read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointFileMissing(f"checkpoint directory not found: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointFileMissing(f"{directory} is not an rsparse checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an rsparse checkpoint manifest (expected \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        written = (manifest.get("versions") or {}).get("rsparse", "?")
        raise CheckpointError(f"{directory} has checkpoint format version {version} (written by rsparse {written}); "
                              f"this rsparse reads versions up to {FORMAT_VERSION}: upgrade rsparse to load it")
    for key, kind in (("layers", list), ("files", dict), ("tied", dict), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"{path}: 'files' does not list {WEIGHTS}")
    for i, l in enumerate(manifest["layers"]):
        ok = (isinstance(l, dict) and isinstance(l.get("name"), str) and l.get("method") in LAYER_METHODS
              and l.get("tokens") in TOKEN_MODES and isinstance(l.get("rank"), int) and l["rank"] >= 0
              and isinstance(l.get("shape"), list) and len(l["shape"]) == 2
              and all(isinstance(s, int) and s > 0 for s in l["shape"]))
        if not ok:
            raise CheckpointError(f"{path}: layer entry {i} is malformed: {l!r}")
    names = [l["name"] for l in manifest["layers"]]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: a layer is listed twice")
    return manifest


def _check_files(directory: Path, manifest: dict, verify: bool) -> dict[str, dict[str, list[int]]]:
    """Existence, size, sha256 and safetensors header of every file; returns {file: {tensor: shape}}."""
    from safetensors import SafetensorError, safe_open

    needed = [HF_CONFIG] + [f for f in manifest.get("other_files", []) if f != HF_CONFIG]
    for name in needed + list(manifest["files"]):
        if not (directory / name).is_file():
            raise CheckpointFileMissing(f"checkpoint {directory} is incomplete: {name} is missing")
    shapes = {}
    for name, info in manifest["files"].items():
        path = directory / name
        size = path.stat().st_size
        if isinstance(info.get("bytes"), int) and size != info["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest recorded {info['bytes']}: the file is "
                                  "truncated or was modified; save the checkpoint again")
        if verify:
            digest = _sha256(path)
            if digest != info.get("sha256"):
                raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST} (file {digest[:12]}..., "
                                      f"manifest {str(info.get('sha256'))[:12]}...): it is corrupted or was modified; "
                                      "save the checkpoint again")
        try:
            with safe_open(str(path), "pt") as f:
                shapes[name] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted") from None
    return shapes


def layer_tensor_shapes(entry: dict) -> dict[str, list[int]]:
    """The stored tensors of one R-Sparse layer (suffix -> shape) that its layout entry implies
    (both formats store the same tensors per layer)."""
    out_f, in_f = entry["shape"]
    r = entry["rank"]
    shapes = {"weight": [out_f, in_f], "lr_down": [in_f, r], "lr_up": [r, out_f], "threshold": [],
              "score_scale": [in_f]}
    if entry.get("bias"):
        shapes["bias"] = [out_f]
    return shapes
