"""Hashes of the files of an rsparse model directory besides its weights, so that any edit is refused.

The weights are hashed tensor by tensor in `quantization_config` (transformers_format). That
left config.json itself and the tokenizer open: an edited `rope_theta` or `rms_norm_eps`
loaded and generated garbage, an edited layer layout or tokenizer went unnoticed. At save time
`record(directory)` writes into `quantization_config["integrity"]`:

  config_sha256   sha256 of config.json without quantization_config (canonical JSON: sorted keys)
  layers_sha256   sha256 of quantization_config's layers (method, rank, shapes, tensor hashes)
  files           {name: sha256} of the tokenizer files, generation_config.json and chat template

`verify(directory)` checks them before any weight is read and names the file that changed.
Directories written before this (no "integrity") load as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rsparse.errors import CheckpointError, CheckpointFileMissing

CONFIG = "config.json"
KEY = "integrity"
# files a model's behaviour depends on, besides the weights and config.json
HASHED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileMissing(f"{path} is missing: copy the whole model directory again") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file was edited or truncated") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object: the file was edited")
    return config


def _digests(config: dict) -> tuple[str, str]:
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    layers = (config.get("quantization_config") or {}).get("layers")
    return _canonical(plain), _canonical(layers)


def record(directory) -> None:
    """Add the integrity record to config.json of a directory being written (before its rename)."""
    directory = Path(directory)
    config = _read_config(directory)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return
    config_sha, layers_sha = _digests(config)
    qc[KEY] = {"config_sha256": config_sha, "layers_sha256": layers_sha,
               "files": {n: sha256_file(directory / n) for n in HASHED_FILES if (directory / n).is_file()}}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify(directory, require_all: bool = True) -> None:
    """Refuse a directory whose config.json or any recorded file differs from what was saved.
    require_all False: a recorded file that is absent is skipped (a hub cache holds only the files
    that were downloaded); an edited one is still refused."""
    directory = Path(directory)
    config = _read_config(directory)
    qc = config.get("quantization_config")
    record_ = qc.get(KEY) if isinstance(qc, dict) else None
    if record_ is None:
        return  # written before the record existed
    if not isinstance(record_, dict) or not isinstance(record_.get("files"), dict):
        raise CheckpointError(f"{directory / CONFIG}: quantization_config.{KEY} is malformed: the file was edited")
    config_sha, layers_sha = _digests(config)
    edited = "was edited: save the model again from its source, or copy the original directory"
    if config_sha != record_.get("config_sha256"):
        raise CheckpointError(f"{directory / CONFIG} does not match its recorded sha256 (the model settings, e.g. "
                              f"rope_theta or rms_norm_eps, changed): the file {edited}")
    if layers_sha != record_.get("layers_sha256"):
        raise CheckpointError(f"{directory / CONFIG}: the R-Sparse layer layout in quantization_config does not match "
                              f"its recorded sha256: the file {edited}")
    for name, digest in record_["files"].items():
        path = directory / str(name)
        if not path.is_file():
            if not require_all:
                continue
            raise CheckpointFileMissing(f"{path} is missing: copy the whole model directory again")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match its recorded sha256: the file {edited}")
