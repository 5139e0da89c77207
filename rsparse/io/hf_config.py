"""model_type "rsparse" in transformers' AutoConfig (docs/checkpoint-format.md, section 2).

An rsparse directory's config.json says `"model_type": "rsparse"`, so that transformers without
rsparse refuses it instead of loading the dense weights. `RSparseModelConfig`, registered with
AutoConfig when this module is imported (by `import rsparse`'s hook as soon as transformers loads
AutoConfig), reads such a file as the base model's own config with the rsparse
quantization_config; `marked_class` is how a config writes itself back with that model_type.
Needs only transformers' config modules (no torch model code), so registering is cheap.
"""

from __future__ import annotations

import json

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

from rsparse.core.sparse_modules import QUANT_METHOD
from rsparse.io.hf_checks import CONFIG, TransformersFormatError


def mark_config_dict(config: dict) -> dict:
    """config.json as written for an rsparse model: model_type "rsparse", the base model's type kept
    in quantization_config["base_model_type"]."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD and config.get("model_type") != QUANT_METHOD:
        qc["base_model_type"] = config["model_type"]
        config["model_type"] = QUANT_METHOD
    return config


_MARKED: dict[type, type] = {}


def marked_class(base: type) -> type:
    """`base` (LlamaConfig, ...) whose next to_json_string writes model_type "rsparse" and then
    turns the config back into a plain `base`. The quantizer switches a model's config to it while
    transformers saves the model (get_state_dict_and_metadata runs just before config.json is
    written), so `model.save_pretrained` writes the marked config.json too."""
    if base not in _MARKED:
        def to_json_string(self, use_diff: bool = True) -> str:
            self.__class__ = base
            return json.dumps(mark_config_dict(json.loads(base.to_json_string(self, use_diff))), indent=2,
                              sort_keys=True) + "\n"

        # the same name: transformers' auto mappings look config classes up by name
        _MARKED[base] = type(base.__name__, (base,), {"to_json_string": to_json_string,
                                                      "__module__": base.__module__, "__qualname__": base.__qualname__})
    return _MARKED[base]


class RSparseModelConfig(PreTrainedConfig):
    """model_type "rsparse" in AutoConfig: reads the config as the base model's own config class
    (with the rsparse quantization_config), so AutoModelForCausalLM builds the base architecture."""

    model_type = QUANT_METHOD

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        qc = config_dict.get("quantization_config")
        base = qc.get("base_model_type") if isinstance(qc, dict) else None
        if base not in CONFIG_MAPPING or base == QUANT_METHOD:
            raise TransformersFormatError(
                f"{CONFIG} has model_type {QUANT_METHOD!r} but its quantization_config names no known base model "
                f"type (base_model_type {base!r}): the file is damaged or written by a newer rsparse")
        return CONFIG_MAPPING[base].from_dict({**config_dict, "model_type": base}, **kwargs)


AutoConfig.register(QUANT_METHOD, RSparseModelConfig, exist_ok=True)
