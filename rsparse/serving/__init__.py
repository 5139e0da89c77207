"""Serving rsparse directories with other engines (vLLM: docs/serving-vllm.md).

rsparse.serving.fused imports torch only; rsparse.serving.vllm_method and vllm_plugin import
vLLM, lazily, so that `import rsparse` never needs it.
"""
