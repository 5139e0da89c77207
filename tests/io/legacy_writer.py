"""Writes a checkpoint in the older rsparse.json format (rsparse <= 0.1), as that rsparse did, so the
tests can check `rsparse convert` and the refusals. The library no longer writes this format."""

import hashlib
import json

import torch
from safetensors.torch import save_file

from rsparse.core.layer import rsparse_layers


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_legacy(model, tokenizer, directory, report=None, config=None):
    directory.mkdir(parents=True)
    names = {id(m): n for n, m in model.named_modules()}
    layers = [{"name": names[id(l)], "method": l.method, "tokens": l.tokens, "keep_fraction": float(l.keep_fraction),
               "rank": int(l.rank), "shape": [l.out_features, l.in_features], "bias": l.bias is not None}
              for l in rsparse_layers(model)]
    tensors, tied, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().cpu().contiguous().clone()
    qc = model.config.__dict__.pop("quantization_config", None)
    try:
        model.config.save_pretrained(directory)
    finally:
        if qc is not None:
            model.config.quantization_config = qc
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    others = sorted(p.name for p in directory.iterdir() if p.name != "model.safetensors")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    manifest = {
        "format": "rsparse-checkpoint", "format_version": 1, "versions": {"rsparse": "0.1.0"},
        "model": {"architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
                  "config": model.config.to_dict()},
        "sparsified": bool(layers), "layers": layers, "rsparse_config": config.to_dict() if config else None,
        "recipe": None, "report": report, "tied": tied, "tokenizer": True, "other_files": others,
        "files": {"model.safetensors": {"sha256": _sha256(directory / "model.safetensors"),
                                        "bytes": (directory / "model.safetensors").stat().st_size,
                                        "tensors": len(tensors)}},
        "other_sha256": {n: _sha256(directory / n) for n in others},
    }
    (directory / "rsparse.json").write_text(json.dumps(manifest, indent=2, default=str))
    return directory
