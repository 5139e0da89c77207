"""vLLM's entry point for rsparse (`vllm.general_plugins` in pyproject.toml): vLLM calls
register() in every process it starts (API server, engine core, each tensor-parallel worker)
before it reads a model's config, sometimes more than once.

It teaches that process the two things an rsparse directory needs:
  - its config.json: `"model_type": "rsparse"`, which vLLM reads through transformers' AutoConfig;
    importing rsparse.io.transformers_format registers that type (the base model's config class,
    from quantization_config.base_model_type, with `architectures` as saved: LlamaForCausalLM, ...);
  - its quant_method "rsparse": rsparse.serving.vllm_method.RSparseVllmConfig in vLLM's registry.
"""

from __future__ import annotations


def register() -> None:
    import rsparse.io.transformers_format  # noqa: F401 (AutoConfig learns model_type "rsparse")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from rsparse.serving.vllm_method import RSparseVllmConfig

    if "rsparse" not in QUANTIZATION_METHODS:
        register_quantization_config("rsparse")(RSparseVllmConfig)
