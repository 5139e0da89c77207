"""Checks of a transformers-format rsparse directory, before any weight is read into a model: the
errors, the stored tensors each layer's layout implies, the shard headers against the layer list,
and the sha256 of the tensors (per R-Sparse layer, and one over all the others)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from pathlib import Path

import torch


from rsparse.errors import CheckpointError, CheckpointFileMissing

CONFIG = "config.json"
_BUFFERS = ("lr_down", "lr_up", "threshold", "score_scale")

# False inside `verify_hashes(False)`: the quantizer skips the sha256 pass (every other check runs).
_VERIFY: contextvars.ContextVar = contextvars.ContextVar("rsparse_verify_hashes", default=True)


class TransformersFormatError(CheckpointError):
    """A transformers-format rsparse directory that cannot be loaded or saved (the message says why)."""


class TransformersFormatFileMissing(TransformersFormatError, CheckpointFileMissing):
    """A file of the directory (a shard, config.json) does not exist."""


@contextlib.contextmanager
def verify_hashes(enabled: bool = True):
    """Within the block, from_pretrained checks (or, with False, skips) the tensors' sha256."""
    token = _VERIFY.set(bool(enabled))
    try:
        yield
    finally:
        _VERIFY.reset(token)


# -- helpers --------------------------------------------------------------------------------------
def layer_tensor_shapes(entry: dict) -> dict[str, list[int]]:
    """The stored tensors of one R-Sparse layer (suffix -> shape) that its layout entry implies."""
    out_f, in_f = entry["shape"]
    r = entry["rank"]
    if entry.get("weight_bits", 16) == 4:  # 4-bit codes instead of the weight (rsparse/core/int4.py)
        weights = {"qweight": [in_f, out_f // 2], "scales_zeros": [in_f // entry["group_size"], out_f, 2]}
    else:
        weights = {"weight": [out_f, in_f]}
    shapes = {**weights, "lr_down": [in_f, r], "lr_up": [r, out_f], "threshold": [], "score_scale": [in_f]}
    if entry.get("bias"):
        shapes["bias"] = [out_f]
    return shapes



def _hash_tensor(h, key: str, tensor: torch.Tensor) -> None:
    """Feed key, dtype, shape and the raw bytes (row-major, as safetensors stores them) to h."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _digest(items) -> str:
    """sha256 over (key, tensor) pairs in key order."""
    h = hashlib.sha256()
    for key, tensor in sorted(items, key=lambda kv: kv[0]):
        _hash_tensor(h, key, tensor)
    return h.hexdigest()


def _read_fraction(layers: dict) -> float | None:
    """Fraction of the decoder-projection weights one decode step reads (targets: keep fraction
    and rank of each layer), over the listed layers."""
    dense = read = 0.0
    for e in layers.values():
        out_f, in_f = e["shape"]
        size = out_f * in_f
        dense += size
        if e["method"] == "dense" or e["tokens"] == "none":
            read += size
        else:
            read += e["keep_fraction"] * size + e["rank"] * (in_f + out_f)
    return read / dense if dense else None


def _layer_keys(layers: dict) -> set[str]:
    return {f"{n}.{t}" for n, e in layers.items() for t in layer_tensor_shapes(e)}


def _tied_aliases(model) -> set[str]:
    try:
        return set(getattr(model, "all_tied_weights_keys", {}) or {})
    except Exception:  # noqa: BLE001 - older/newer transformers
        return set()


def check_files(checkpoint_files, layers: dict) -> dict[str, tuple[str, list[int], str]]:
    """Headers of every shard and the layer list against them; returns {tensor: (file, shape, dtype)}."""
    from safetensors import SafetensorError, safe_open

    if not checkpoint_files:
        raise TransformersFormatError("no safetensors weight files were found for this rsparse model")
    stored = {}
    for file in checkpoint_files:
        path = Path(file)
        if not path.is_file():
            raise TransformersFormatFileMissing(f"weight shard {path} is missing: copy the whole directory again")
        if path.suffix != ".safetensors":
            raise TransformersFormatError(f"{path}: rsparse directories hold safetensors files only")
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    stored[key] = (path.name, list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise TransformersFormatError(f"{path} is not a readable safetensors file ({e}): it is truncated or "
                                          "corrupted; copy it again") from None
    for name, entry in layers.items():
        for tname, shape in layer_tensor_shapes(entry).items():
            key = f"{name}.{tname}"
            if key not in stored:
                raise TransformersFormatError(f"layer {name} of quantization_config has no tensor {key} in the weight "
                                              "files: the files do not match the config")
            if stored[key][1] != shape:
                raise TransformersFormatError(
                    f"tensor {key} has shape {stored[key][1]} in {stored[key][0]}, but quantization_config implies "
                    f"{shape} (layer shape {entry['shape']}, rank {entry['rank']}): the files do not match the config")
    listed = set(layers)
    for key in stored:
        prefix, _, suffix = key.rpartition(".")
        if suffix in _BUFFERS and prefix not in listed:
            raise TransformersFormatError(f"{stored[key][0]} holds {key}, but quantization_config lists no R-Sparse layer "
                                          f"{prefix}: the files do not match the config")
    return stored


def check_hashes(checkpoint_files, stored: dict, qc) -> None:
    """The sha256 of every layer's tensors and of all other tensors against quantization_config."""
    from safetensors import safe_open

    if not qc.layers and not qc.tensors.get("other_sha256"):
        return
    by_name = {Path(f).name: Path(f) for f in checkpoint_files}
    handles = {}
    try:
        def get(key):
            file = stored[key][0]
            if file not in handles:
                handles[file] = safe_open(str(by_name[file]), "pt").__enter__()
            return handles[file].get_tensor(key)

        for name, entry in qc.layers.items():
            if "sha256" not in entry:
                continue
            keys = [f"{name}.{t}" for t in layer_tensor_shapes(entry)]
            digest = _digest((k, get(k)) for k in keys)
            if digest != entry["sha256"]:
                files = sorted({stored[k][0] for k in keys})
                raise TransformersFormatError(
                    f"the tensors of layer {name} in {', '.join(files)} do not match their sha256 in {CONFIG} (file "
                    f"{digest[:12]}..., config {str(entry['sha256'])[:12]}...): a file was modified or corrupted; copy "
                    "or save it again")
        expected = qc.tensors.get("other_sha256")
        if expected:
            owned = _layer_keys(qc.layers)
            others = [k for k in stored if k not in owned]
            digest = _digest((k, get(k)) for k in others)
            if digest != expected:
                raise TransformersFormatError(
                    f"the tensors outside the R-Sparse layers (embeddings, norms, lm_head, ...) do not match their sha256 "
                    f"in {CONFIG}: a weight file was modified or corrupted; copy or save it again")
        count = qc.tensors.get("count")
        if isinstance(count, int) and count != len(stored):
            raise TransformersFormatError(f"the weight files hold {len(stored)} tensors, {CONFIG} recorded {count}: a "
                                          "file was modified; copy or save it again")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


# -- attaching to an in-memory model ---------------------------------------------------------------
