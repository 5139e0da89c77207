"""Plain torch versions of the R-Sparse decode calls (triton_rsparse.py): same semantics, fp32
accumulation, any number of rows, any device. What the kernels are tested against, and what runs
where they do not.
"""

from __future__ import annotations

import torch


def _threshold_f32(threshold, device) -> torch.Tensor:
    return torch.as_tensor(threshold, dtype=torch.float32, device=device).reshape(())


def rsparse_decode_linear_reference(x, w_t, threshold, score_scale=None, lr_down=None, lr_up=None,
                                    bias=None) -> torch.Tensor:
    """Plain torch version of :func:`rsparse_decode_linear` (same semantics, fp32 accumulate).

    Works for any number of rows and on any device; output in ``x``'s dtype.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    xf = x.reshape(-1, K).float()
    score = xf.abs()
    if score_scale is not None:
        score = score * score_scale.reshape(1, K).float()
    keep = score > _threshold_f32(threshold, x.device)
    y = (xf * keep) @ w_t.float()
    if lr_down is not None and lr_up is not None and lr_down.numel() > 0 and lr_up.numel() > 0:
        z = (xf * ~keep) @ lr_down.float()
        y = y + z @ lr_up.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, w_t.shape[1])


def _part_tuple(part) -> tuple:
    """(w_t, threshold, score_scale, lr_down, lr_up, bias) from a tuple of 2 to 6 entries."""
    part = tuple(part)
    if not 2 <= len(part) <= 6:
        raise ValueError("each part is (w_t, threshold[, score_scale[, lr_down[, lr_up[, bias]]]])")
    return part + (None,) * (6 - len(part))


def rsparse_decode_linear_multi_reference(x, parts) -> tuple:
    """Plain torch version of :func:`rsparse_decode_linear_multi`: one reference call per part."""
    return tuple(rsparse_decode_linear_reference(x, *_part_tuple(p)) for p in parts)
