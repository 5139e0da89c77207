"""Where a decode step's device time goes: the profiler over replays of the engine's step, kernel
times summed by kernel group (R-Sparse kernels, attention, cuBLAS products, fused glue, other),
and the step's wall time minus its kernels (launch gaps). Used by `rsparse bench decode --profile`.
"""

from __future__ import annotations

import time

import torch

# Kernel groups of a decode step, by kernel name (first match wins; the rest is "other").
KERNEL_GROUPS = (("R-Sparse kernels", ("_z_kernel", "_main_kernel", "_epilogue_kernel", "_split_input_kernel")),
                 ("attention", ("attention", "fmha", "flash", "flex", "attn", "sdpa", "cudnn")),
                 ("cuBLAS products", ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk")),
                 ("fused glue", ("triton_",)))
GROUP_NAMES = [g for g, _ in KERNEL_GROUPS] + ["other"]


def _group(kernel: str) -> str:
    name = kernel.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")


def profile_step(engine, prompt: list[int], steps: int = 16) -> dict:
    """Device time of one decode step by kernel group (us), from the profiler over `steps`
    replays of the step as generate runs it (the captured graph on CUDA); the step's wall time
    minus its kernels is the time no kernel ran (launch gaps). Kernels chained by programmatic
    dependent launch (the R-Sparse ones) are resident while they wait for their predecessor, so
    their durations overlap: where the sum exceeds the step, gaps are None."""
    from torch.profiler import ProfilerActivity, profile

    from rsparse.runtime.engine import Sampling

    step = engine._step_fn(Sampling())
    if len(prompt) + steps > engine.max_seq_len:
        raise ValueError("profile_step: the cache has no room for the profiled steps")

    def run():
        engine.pos.fill_(len(prompt))  # slots after the prompt: the cache holds the last generate's
        engine.done.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    run()
    wall = run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    per_kernel: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower():
            per_kernel.setdefault(e.name, []).append(e.time_range.elapsed_us())
    groups = {g: 0.0 for g in GROUP_NAMES}
    for name, times in per_kernel.items():
        groups[_group(name)] += sum(times) / steps
    busy = sum(groups.values())
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"step_us": 1e6 * wall, "kernel_us": busy, "gaps_us": 1e6 * wall - busy if busy <= 1e6 * wall else None,
            "kernels_per_step": sum(len(t) for t in per_kernel.values()) / steps,
            "groups_us": groups,
            "top_kernels": [{"name": n[:120], "us_per_step": sum(t) / steps, "calls_per_step": len(t) / steps}
                            for n, t in top]}
