"""The quantization method "rsparse" in vLLM: a QuantizationConfig read from config.json's
quantization_config, and a linear method that loads an R-Sparse layer's tensors and applies it
(rsparse.serving.fused). Imported by rsparse.serving.vllm_plugin.register() in every vLLM process.

vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj: such a layer holds its parts'
thresholds, score scales and factors side by side, and each part keeps its own mask. Tensor
parallelism follows docs/serving-vllm.md section 4: column-parallel layers replicate the
per-input-channel tensors (every rank sees the whole input) and split lr_up along outputs;
row-parallel layers split score_scale and lr_down along inputs and replicate lr_up, so vLLM's one
all-reduce sums the partial low-rank products too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.nn import Parameter
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase, LinearMethodBase,
                                               MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear, UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from rsparse.core.layer import column_major
from rsparse.io.transformers_format import RSparseQuantizationConfig
from rsparse.serving.fused import fused_linear, one_token_rows, shard

# vLLM architectures whose R-Sparse layers vLLM names as transformers does, with the fused
# qkv_proj / gate_up_proj of packed_modules_mapping (LlamaForCausalLM is the one tested).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QKV_IDS = {"q": 0, "k": 1, "v": 2}


class RSparseServingError(ValueError):
    """An rsparse directory that this plugin cannot serve as asked (one line says why)."""


def _sparse_rows(num_rows: int, device: torch.device) -> torch.Tensor | None:
    """The rows of this step that are decode tokens (one-token requests), from vLLM's forward
    context; all-False (dense) where no attention metadata describes the batch (vLLM's memory
    profiling and warm-up runs, or a call outside vLLM's model runner)."""
    meta = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(meta, list):
        raise RSparseServingError("rsparse: micro-batching (dual batch overlap) is not supported; turn it off")
    starts = next((getattr(m, "query_start_loc", None) for m in (meta or {}).values()), None)
    if starts is None:
        return torch.zeros(num_rows, dtype=torch.bool, device=device)
    return one_token_rows(starts.to(device), num_rows)


@torch.library.custom_op("rsparse::vllm_fused_linear", mutates_args=())
def vllm_fused_linear(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, score_scale: torch.Tensor,
                      lr_down: torch.Tensor, lr_up: torch.Tensor, bias: Optional[torch.Tensor],
                      out_sizes: list[int], ranks: list[int], every_row: bool) -> torch.Tensor:
    """An opaque op so that vLLM's torch.compile keeps it whole: the decode rows are read from
    the forward context at run time, never baked into the compiled graph."""
    rows = None if every_row else _sparse_rows(x.shape[0], x.device)
    return fused_linear(x, weight, threshold, score_scale, lr_down, lr_up, bias, out_sizes, ranks, rows)


@vllm_fused_linear.register_fake
def _vllm_fused_linear_fake(x, weight, threshold, score_scale, lr_down, lr_up, bias, out_sizes, ranks, every_row):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class RSparseVllmConfig(QuantizationConfig):
    """config.json's quantization_config {"quant_method": "rsparse", "layers": {...}, ...}."""

    def __init__(self, layers: dict[str, dict], format_version: int):
        super().__init__()
        self.layers = layers
        self.format_version = format_version

    def get_name(self) -> str:
        return "rsparse"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # what the Triton kernel is tested on (A100, H100, H200)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RSparseVllmConfig":
        # rsparse's own reader: the same format-version refusal and layer checks as from_pretrained
        qc = RSparseQuantizationConfig(**config)
        return cls(qc.layers, qc.format_version)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        archs = list(getattr(hf_config, "architectures", None) or [])
        if hf_config is not None and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise RSparseServingError(f"rsparse: {model_name} is a {'/'.join(archs) or 'model without architectures'}; "
                                      f"the vLLM plugin serves {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        parent, _, name = prefix.rpartition(".")
        names = [f"{parent}.{p}" if parent else p for p in self.packed_modules_mapping.get(name, [name])]
        listed = [n in self.layers for n in names]
        if not any(listed):
            return UnquantizedLinearMethod()  # lm_head and anything not calibrated
        if not all(listed):
            raise RSparseServingError(f"rsparse: {prefix} fuses {names} but only some are R-Sparse layers in "
                                      "quantization_config; this vLLM model cannot serve the directory")
        return RSparseLinearMethod([self.layers[n] for n in names], names)


def _token_mode(entries: list[dict], names: list[str]) -> bool:
    """Whether the layer sparsifies every row (tokens "all") rather than the decode rows ("decode");
    parts that are dense (method "dense" or tokens "none") run with a threshold of -inf."""
    four_bit = [n for n, e in zip(names, entries) if e.get("weight_bits", 16) == 4]
    if four_bit:
        raise RSparseServingError(f"rsparse: {four_bit[0]} stores 4-bit weights (compress --weights int4), which the "
                                  "vLLM plugin does not serve yet; serve a directory compressed with 16-bit weights")
    modes = {e["tokens"] for e in entries if e["method"] != "dense" and e["tokens"] != "none"}
    if "second_half" in modes:
        raise RSparseServingError(f"rsparse: {names[0]} has tokens 'second_half', a scoring mode; serve a directory "
                                  "saved with tokens 'decode' (what rsparse compress writes) or 'all'")
    if len(modes) > 1:
        raise RSparseServingError(f"rsparse: the fused layer of {names} mixes token modes {sorted(modes)}")
    return modes == {"all"}


class RSparseLinearMethod(LinearMethodBase):
    """One R-Sparse layer, or the 2-3 R-Sparse parts of one fused vLLM layer."""

    def __init__(self, entries: list[dict], names: list[str]):
        self.entries = entries
        self.names = names
        self.every_row = _token_mode(entries, names)

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        parts, in_rank = len(self.entries), input_size_per_partition
        if len(output_partition_sizes) != parts:
            raise RSparseServingError(f"rsparse: {layer.prefix} has {len(output_partition_sizes)} parts in vLLM but "
                                      f"{parts} R-Sparse layers {self.names}")
        tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        if isinstance(layer, QKVParallelLinear) and layer.num_kv_head_replicas > 1:
            raise RSparseServingError(f"rsparse: tensor-parallel size {tp_size} exceeds the model's "
                                      f"{layer.total_num_kv_heads} key/value heads (replicated k/v parts are not supported)")
        row_parallel = isinstance(layer, RowParallelLinear)
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear)):
            raise RSparseServingError(f"rsparse: {layer.prefix} is a {type(layer).__name__}, which the plugin does not shard")
        ranks = [e["rank"] for e in self.entries]
        for e, n, name in zip(self.entries, output_partition_sizes, self.names):
            full_out, full_in = e["shape"]
            if full_in != input_size or (tp_size == 1 and full_out != n):
                raise RSparseServingError(f"rsparse: layer {name} is {e['shape']} in quantization_config but "
                                          f"{[n, input_size]} in the vLLM model")
        layer.rsparse_out_sizes = list(output_partition_sizes)
        layer.rsparse_ranks = ranks

        weight = Parameter(torch.empty(sum(output_partition_sizes), in_rank, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)

        def part_of(shard_id) -> int:
            if shard_id is None:
                if parts != 1:
                    raise RSparseServingError(f"rsparse: {layer.prefix}: the checkpoint holds a fused tensor; "
                                              "expected its parts stored separately")
                return 0
            return QKV_IDS[shard_id] if isinstance(shard_id, str) else int(shard_id)

        def per_input(loaded: torch.Tensor, dim: int) -> torch.Tensor:  # split with the input on row-parallel ranks
            return shard(loaded, dim, tp_rank, in_rank) if row_parallel else loaded

        def load_threshold(param, loaded, shard_id=None):
            param.data[part_of(shard_id)] = loaded.reshape(())

        def load_score_scale(param, loaded, shard_id=None):
            param.data[part_of(shard_id)].copy_(per_input(loaded, 0))

        def load_lr_down(param, loaded, shard_id=None):
            p = part_of(shard_id)
            param.data[:, sum(ranks[:p]):sum(ranks[:p + 1])].copy_(per_input(loaded, 0))

        def load_lr_up(param, loaded, shard_id=None):
            p = part_of(shard_id)
            n, r = output_partition_sizes[p], ranks[p]
            start = sum(rk * o for rk, o in zip(ranks[:p], output_partition_sizes[:p]))
            if not row_parallel:  # column-parallel: this rank's outputs of the part
                loaded = shard(loaded, 1, tp_rank, n)
            param.data[start:start + r * n].view(r, n).copy_(loaded)

        tensors = {
            "threshold": (torch.full((parts,), -math.inf, dtype=torch.float32), load_threshold),
            "score_scale": (torch.ones(parts, in_rank, dtype=torch.float32), load_score_scale),
            "lr_down": (torch.zeros(in_rank, sum(ranks), dtype=params_dtype), load_lr_down),
            "lr_up": (torch.zeros(sum(r * n for r, n in zip(ranks, output_partition_sizes)), dtype=params_dtype),
                      load_lr_up),
        }
        for name, (data, loader) in tensors.items():
            param = Parameter(data, requires_grad=False)
            param.weight_loader = loader
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer) -> None:
        # column-major weight: a kept input channel is one contiguous row of W^T (as RSparseLinear)
        layer.weight = Parameter(column_major(layer.weight.data), requires_grad=False)
        for p, e in enumerate(self.entries):
            if e["method"] == "dense" or e["tokens"] == "none":  # a dense part: keep every channel
                layer.threshold.data[p] = -math.inf

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.rsparse.vllm_fused_linear(x, layer.weight, layer.threshold, layer.score_scale, layer.lr_down,
                                                   layer.lr_up, bias, layer.rsparse_out_sizes, layer.rsparse_ranks,
                                                   self.every_row)

