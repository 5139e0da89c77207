"""4-bit group-wise weight quantization under R-Sparse (the paper's Table 2), with HQQ.

    from rsparse.methods.quantize import QuantConfig, quantize_weights_
    q = quantize_weights_(model, QuantConfig(bits=4, group_size=128))  # the 7 projections of every block
    rsparse.sparsify_(model, RSparseConfig(sparsity=0.5), windows)      # R-Sparse on the INT4 weights
    q.restore()                                                          # the original weights back

Weights are quantized by HQQ (half-quadratic quantization, calibration-free; `hqq` on PyPI)
with an asymmetric scale and zero point per group of `group_size` consecutive input channels of
each output row, and stored back dequantized: the model then computes exactly what a weight-only
INT4 kernel computes (it dequantizes in registers), which is what accuracy needs; packing the
4-bit codes for a fused INT4 + sparse kernel is not done here (nor in the paper).
The paper used GPTQ; HQQ needs no calibration data and runs on CPU, where GPTQModel does not.

Rows whose width is not a multiple of the group size (SmolLM2's 576 = 4 x 128 + 64) end in one
shorter group, as GPTQ's last group would; a group never spans two rows.

R-Sparse applied afterwards works on the quantized weights: its kept channels read INT4 columns
and its low-rank factors (kept in the model's float dtype) approximate the quantized matrix.
The embedded SmolLM2 ships as Q4_1 GGUF (4-bit, groups of 32); its "FP" weights are those
dequantized, so INT4 here is a coarser re-quantization (groups of 128) of an already 4-bit model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rsparse.core.models import decoder_linears
from rsparse.errors import BadInputError

SUPPORTED_BITS = (2, 3, 4, 8)
QUANTIZERS = ("hqq", "rtn", "hqq-int4")
# rtn / hqq-int4: rsparse's own 4-bit format (rsparse.core.int4) with RTN or HQQ rounding, what
# compress --weights int4 [--rounding hqq] writes; hqq: HQQ's own format (any bits, float scales)
PACKED = {"rtn": "rtn", "hqq-int4": "hqq"}  # quantizer -> rsparse.core.int4 rounding


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    optimize: bool = True  # HQQ's half-quadratic refinement of scales and zero points (else round-to-nearest)
    # "rtn" / "hqq-int4": the 4-bit format the kernels run (rsparse.core.int4: RTN with an integer
    # zero point, or HQQ's scales and zeros; bf16 scale and zero; a layer whose width group_size does
    # not divide gets the largest smaller size that does), so a score is that of
    # `rsparse compress --weights int4 [--rounding hqq]`'s model
    quantizer: str = "hqq"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise BadInputError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.quantizer not in QUANTIZERS:
            raise BadInputError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer in PACKED and self.bits != 4:
            raise BadInputError(f"the {self.quantizer} quantizer writes rsparse's 4-bit format: bits must be 4, got {self.bits}")
        if int(self.group_size) != self.group_size or self.group_size < 8 or self.group_size % 8:
            raise BadInputError(f"group_size must be a positive multiple of 8, got {self.group_size!r}")

    @property
    def label(self) -> str:
        return f"INT{self.bits}" + {"rtn": " RTN", "hqq-int4": " HQQ-packed"}.get(self.quantizer, "")


@dataclass
class QuantizedWeights:
    """What quantize_weights_ did: per-layer relative errors, and the originals for `restore`."""
    model: nn.Module
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)  # {"name", "shape", "relative_error"}
    originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def mean_relative_error(self) -> float:
        return sum(l["relative_error"] for l in self.layers) / max(1, len(self.layers))

    def restore(self) -> None:
        """Put the original (unquantized) weights back, bit for bit. R-Sparse layers stay R-Sparse
        layers with the original weight; their factors and thresholds were fitted to the quantized
        weights, so undo R-Sparse (rsparse.restore_) before restoring, or sparsify again after."""
        if not self.originals:
            raise RuntimeError("the original weights were not kept (quantize_weights_(..., keep_original=False))")
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, w in self.originals.items():
                modules[name].weight.copy_(w.to(modules[name].weight.device))
        self.originals.clear()


def quantize_tensor(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """The (out, in) weight quantized group-wise along its input channels and dequantized, in its dtype."""
    if config.quantizer in PACKED:
        from rsparse.core.int4 import dequantize, quantize
        from rsparse.core.int4_layer import layer_group_size

        g = layer_group_size(weight.shape[1], config.group_size)
        return dequantize(quantize(weight, g, PACKED[config.quantizer]), weight.dtype)
    from hqq.core.quantize import Quantizer

    w = weight.detach().float()
    out_features, in_features = w.shape
    full = (in_features // config.group_size) * config.group_size
    parts = []
    for lo, hi, group in ((0, full, config.group_size), (full, in_features, in_features - full)):
        if hi <= lo:
            continue
        codes, meta = Quantizer.quantize(w[:, lo:hi].contiguous(), nbits=config.bits, group_size=group,
                                         optimize=config.optimize, round_zero=config.bits == 4, axis=1,
                                         bitpack=False, device=str(w.device))
        meta["compute_dtype"] = torch.float32
        parts.append(Quantizer.dequantize(codes, meta))
    return torch.cat(parts, dim=1).to(weight.dtype)


@torch.no_grad()
def quantize_weights_(model: nn.Module, config: QuantConfig = QuantConfig(), keep_original: bool = True,
                      progress: bool = True) -> QuantizedWeights:
    """Quantize the weights of the 7 projections of every decoder block in place (see module
    docstring). Works on plain nn.Linear and on R-Sparse layers' weights alike; call it before
    rsparse.sparsify_ so that the factors and thresholds fit the quantized weights."""
    from rsparse.progress import progress as bar

    linears = decoder_linears(model)  # UnsupportedModelError for anything else
    result = QuantizedWeights(model, config)
    for lin in bar(linears, desc=f"quantizing ({config.label}, group {config.group_size})", unit="layer",
                   disable=not progress, leave=False):
        w = lin.module.weight
        q = quantize_tensor(w, config)
        if keep_original:
            result.originals[lin.name] = w.detach().to("cpu", copy=True)
        err = float((q.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        w.copy_(q)  # copy_ keeps R-Sparse layers' column-major storage
        result.layers.append({"name": lin.name, "shape": list(w.shape), "relative_error": err})
    return result
