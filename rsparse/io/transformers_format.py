"""The rsparse quant method in transformers: a registered quantization config and quantizer that
rebuild R-Sparse layers in `from_pretrained`, and a registered config type that keeps the
directory from ever loading as a dense model where rsparse is not installed.

    import rsparse                                   # registers all of this with transformers
    rsparse.sparsify_(model, config, calib)          # attaches the "rsparse" quantizer to the model
    model.save_pretrained("out/m")                   # safetensors shards + config.json (model_type "rsparse")
    model = AutoModelForCausalLM.from_pretrained("out/m", dtype="auto", device_map="cpu")

The tensors are the state dict: for every R-Sparse layer N, `N.weight` (out, in) row-major,
`N.bias`, `N.lr_down` (in, r), `N.lr_up` (r, out), `N.threshold` () float32 and `N.score_scale`
(in,) float32. `config.json` has `"model_type": "rsparse"` and `"quantization_config":
{"quant_method": "rsparse", "base_model_type": "llama", "format_version": 1, "layers": {N: {method,
tokens, keep_fraction, rank, shape, bias, sha256}}, ...}` (docs/checkpoint-format.md). On load the
quantizer checks the format version, the shard headers, the layer list against the tensors and the
model config, and the sha256 of every tensor before any weight is read into the model; it then
builds RSparseLinear layers in place of the listed nn.Linear layers, and lays the weights out
column-major after loading (as sparsify_ does), so the logits are bit-identical to the saved
model's on the same device and dtype.

Why model_type "rsparse": transformers skips a quantization_config it does not know with a warning
and loads the dense weights; an unknown model_type it refuses. With rsparse imported, the
registered `RSparseModelConfig` reads such a config.json as the base model's config (LlamaConfig,
...) with the rsparse quantization_config, so every Auto class works as for any model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rsparse.core.config import INT4_GROUP_SIZES
from rsparse.core.int4_layer import Int4RSparseLinear
from rsparse.core.layer import LAYER_METHODS as METHODS
from rsparse.core.layer import TOKEN_MODES, RSparseLinear, column_major, rsparse_layers
from rsparse.core.sparse_modules import QUANT_METHOD
from rsparse.io import integrity
from rsparse.io.hf_config import marked_class
from rsparse.io.hf_checks import (_VERIFY, CONFIG, TransformersFormatError, _digest, _layer_keys, _read_fraction,
                                  _tied_aliases, check_files, check_hashes, layer_tensor_shapes)
from rsparse.io.results import json_safe

FORMAT_VERSION = 1  # the newest directory format this rsparse reads and the one it writes



# -- the quantization config ------------------------------------------------------------------------
@register_quantization_config(QUANT_METHOD)
class RSparseQuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of an rsparse directory: per-layer layout, recipe, format version, hashes.

    The layout and the hashes are (re)computed from the model each time it is saved; the recipe
    fields (`rsparse_config`, `summary`) come from `sparsify_` or `rsparse.save_pretrained`.
    """

    def __init__(self, format_version: int = FORMAT_VERSION, layers: dict | None = None,
                 tensors: dict | None = None, rsparse_config: dict | None = None, summary: dict | None = None,
                 versions: dict | None = None, quant_method: str = QUANT_METHOD, **kwargs):
        if quant_method != QUANT_METHOD:
            raise TransformersFormatError(f"quant_method {quant_method!r} is not {QUANT_METHOD!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise TransformersFormatError(f"quantization_config: invalid rsparse format_version {format_version!r}")
        if format_version > FORMAT_VERSION:
            written = (versions or {}).get("rsparse", "?")
            raise TransformersFormatError(
                f"this model was saved in rsparse format version {format_version} (by rsparse {written}); this rsparse "
                f"reads versions up to {FORMAT_VERSION}: upgrade rsparse to load it")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = _check_layers(layers or {})
        self.tensors = dict(tensors or {})
        self.rsparse_config = rsparse_config
        self.summary = dict(summary or {})
        self.versions = dict(versions or {})
        self.base_model_type = kwargs.pop("base_model_type", None)  # config.json's model_type before "rsparse"
        for key, value in kwargs.items():  # optional fields of newer writers (same format version)
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return json_safe(dict(self.__dict__))

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    # -- filled at save time ----------------------------------------------------------------------
    def describe(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Set the layout, the hashes and the versions from the model about to be saved."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        from rsparse.io.results import versions

        names = {id(m): n for n, m in model.named_modules()}
        layers = {}
        for layer in rsparse_layers(model):
            layers[names[id(layer)]] = {
                "method": layer.method, "tokens": layer.tokens, "keep_fraction": float(layer.keep_fraction),
                "rank": int(layer.rank), "shape": [layer.out_features, layer.in_features],
                "bias": layer.bias is not None}
            if layer.weight_bits == 4:
                layers[names[id(layer)]].update(weight_bits=4, group_size=layer.group_size)
        stored = remove_tied_weights_from_state_dict(dict(state), model)  # what save_pretrained writes
        for key, value in stored.items():
            if value.device.type == "meta":
                raise TransformersFormatError(f"tensor {key} is on the meta device (offloaded); cannot hash it for "
                                              "saving: load the model on one device first")
        owned = set()
        for name, entry in layers.items():
            keys = [f"{name}.{t}" for t in layer_tensor_shapes(entry)]
            owned.update(keys)
            entry["sha256"] = _digest((k, stored[k]) for k in keys)
        others = [k for k in stored if k not in owned]
        self.layers = layers
        self.tensors = {"count": len(stored), "other_sha256": _digest((k, stored[k]) for k in others),
                        "dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                          torch.float32)).removeprefix("torch.")}
        self.versions = versions()
        self.summary["read_fraction"] = _read_fraction(layers)
        self.summary["layers"] = len(layers)
        self.summary["methods"] = {m: sum(e["method"] == m for e in layers.values()) for m in METHODS
                                   if any(e["method"] == m for e in layers.values())}


def _check_layers(layers) -> dict:
    if not isinstance(layers, dict):
        raise TransformersFormatError("quantization_config.layers must be an object {module name: layout}")
    for name, e in layers.items():
        ok = (isinstance(e, dict) and e.get("method") in METHODS and e.get("tokens") in TOKEN_MODES
              and isinstance(e.get("rank"), int) and not isinstance(e.get("rank"), bool) and e["rank"] >= 0
              and isinstance(e.get("keep_fraction"), (int, float)) and isinstance(e.get("shape"), list)
              and len(e["shape"]) == 2 and all(isinstance(s, int) and s > 0 for s in e["shape"])
              and (e.get("weight_bits", 16) == 16 or (e.get("weight_bits") == 4 and e.get("group_size") in INT4_GROUP_SIZES
                                                       and e["shape"][1] % e["group_size"] == 0 and e["shape"][0] % 8 == 0)))
        if not ok:
            raise TransformersFormatError(f"quantization_config: layer entry {name!r} is malformed: {e!r}")
    return {n: dict(e) for n, e in layers.items()}


# -- the quantizer --------------------------------------------------------------------------------
@register_quantizer(QUANT_METHOD)
class RSparseHfQuantizer(HfQuantizer):
    """Rebuilds R-Sparse layers in from_pretrained; computes layout and hashes in save_pretrained."""

    requires_calibration = False  # (pre_quantized is checked in validate_environment, with a clearer message)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise TransformersFormatError(
                "rsparse cannot sparsify while loading: it needs calibration data. Load the dense model, run "
                "rsparse.sparsify_(model, RSparseConfig(...), calibration), then save_pretrained")

    def update_dtype(self, dtype):
        return dtype

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        state = model.state_dict()
        self.quantization_config.describe(model, state)
        model.config.quantization_config = self.quantization_config
        base = type(model.config)
        if base.model_type in CONFIG_MAPPING and CONFIG_MAPPING[base.model_type] is base:
            model.config.__class__ = marked_class(base)  # config.json is written next: model_type "rsparse"
        return state, {"rsparse_format_version": str(FORMAT_VERSION)}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        from rsparse.core.models import replace_module

        layers = self.quantization_config.layers
        if checkpoint_files:  # config.json and tokenizer edits, before any weight is read
            integrity.verify(Path(checkpoint_files[0]).parent, require_all=False)
        stored = check_files(checkpoint_files or [], layers)
        modules = dict(model.named_modules())
        for name, entry in layers.items():
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise TransformersFormatError(
                    f"layer {name} of quantization_config is not a linear layer of the {type(model).__name__} that "
                    f"{CONFIG} describes: the layer list does not match the model config")
            if [linear.out_features, linear.in_features] != entry["shape"]:
                raise TransformersFormatError(
                    f"layer {name} has shape {entry['shape']} in quantization_config but "
                    f"[{linear.out_features}, {linear.in_features}] in the model {CONFIG} describes: the layer list "
                    "does not match the model config")
            if bool(entry.get("bias")) != (linear.bias is not None):
                raise TransformersFormatError(f"layer {name}: bias in quantization_config does not match the model config")
        state = model.state_dict()
        expected = set(state)
        for name, entry in layers.items():
            if entry.get("weight_bits") == 4:  # 4-bit codes stand in for the dense weight
                expected.discard(f"{name}.weight")
            expected.update(f"{name}.{t}" for t in layer_tensor_shapes(entry))
        tied = _tied_aliases(model)
        missing = sorted(k for k in expected if k not in stored and k not in tied)
        if missing:
            raise TransformersFormatError(
                f"the tensor files do not hold {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
                f"which the model {CONFIG} describes needs: the files do not match the config")
        owned = _layer_keys(layers)
        for key, (file, shape, _) in stored.items():
            if key in state and key not in owned and list(state[key].shape) != shape:
                raise TransformersFormatError(f"tensor {key} has shape {shape} in {file} but {list(state[key].shape)} in "
                                              f"the model {CONFIG} describes")
        if _VERIFY.get():
            check_hashes(checkpoint_files, stored, self.quantization_config)
        for name, entry in layers.items():
            linear = modules[name]
            kind, extra = ((Int4RSparseLinear, {"group_size": entry["group_size"]}) if entry.get("weight_bits") == 4
                           else (RSparseLinear, {}))
            layer = kind(linear.in_features, linear.out_features, rank=entry["rank"], bias=linear.bias is not None,
                         device="meta", dtype=linear.weight.dtype, name=name, **extra)
            layer.method, layer.tokens = entry["method"], entry["tokens"]
            layer.keep_fraction = float(entry["keep_fraction"])
            replace_module(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for layer in rsparse_layers(model):
            if isinstance(layer, Int4RSparseLinear):  # codes as stored; scales back to bf16, tinygemm packing
                layer.settle()
                continue
            if layer.weight.device.type == "meta":  # offloaded: left to accelerate's hooks as stored
                continue
            layer.weight = nn.Parameter(column_major(layer.weight), requires_grad=False)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
        return model

    def _dequantize(self, model, dtype=None):
        from rsparse.core.sparse_modules import restore_

        return restore_(model)


def attach(model: nn.Module, config=None, report: list[dict] | None = None) -> RSparseQuantizationConfig:
    """Give a sparsified model the rsparse quantizer, so that `model.save_pretrained` writes this format.

    Called by sparsify_; config (RSparseConfig or dict) and report (sparsify_'s) feed the recipe
    summary. Keeps the recipe fields of a quantizer already attached unless new ones are given.
    """
    current = getattr(model, "hf_quantizer", None)
    qc = current.quantization_config if isinstance(current, RSparseHfQuantizer) else RSparseQuantizationConfig()
    if config is not None:
        qc.rsparse_config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        qc.summary.pop("target_sparsity", None)
        target = qc.rsparse_config.get("sparsity")
        if isinstance(target, (int, float)):
            qc.summary["target_sparsity"] = float(target)
    if report is not None:
        dense = sum(r["shape"][0] * r["shape"][1] for r in report) or 1
        qc.summary["calibrated_read_fraction"] = sum(r["read_fraction"] * r["shape"][0] * r["shape"][1]
                                                     for r in report) / dense
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = qc
    model.hf_quantizer = current if isinstance(current, RSparseHfQuantizer) else RSparseHfQuantizer(qc, pre_quantized=True)
    return qc
