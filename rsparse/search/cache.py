"""A byte-bounded least-recently-used cache, with an optional CPU spill tier.

The per-layer search re-plans every layer for every candidate. What a plan needs and is worth
keeping (a layer's sorted calibration scores, whitened factors per rank and threshold) grows with
the number of distinct (layer, sparsity, rho) values the search visits: unbounded, it reached
tens of GB for the per-layer search of a 135M model. This cache holds at most `max_bytes` on the
entries' own device; with `spill_bytes` > 0, entries evicted from a GPU are kept on the CPU (up
to that many bytes) and moved back when asked for, which is cheaper than refitting them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def nbytes(value) -> int:
    """Bytes held by a tensor, or a tuple/list of them (None counts 0)."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _device(value):
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (tuple, list)):
        return next((_device(v) for v in value if _device(v) is not None), None)
    return None


class BoundedCache:
    def __init__(self, max_bytes: int, spill_bytes: int = 0):
        self.max_bytes, self.spill_bytes = int(max_bytes), int(spill_bytes)
        self._main: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._spill: OrderedDict = OrderedDict()  # key -> (cpu value, bytes, original device)
        self.held = self.spilled = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._main) + len(self._spill)

    def __contains__(self, key) -> bool:
        return key in self._main or key in self._spill

    def get(self, key):
        if key in self._main:
            self._main.move_to_end(key)
            self.hits += 1
            return self._main[key][0]
        if key in self._spill:
            value, size, device = self._spill.pop(key)
            self.spilled -= size
            self.hits += 1
            value = _to(value, device)
            self.put(key, value)
            return value
        self.misses += 1
        return None

    def put(self, key, value):
        size = nbytes(value)
        if key in self._main:
            self.held -= self._main.pop(key)[1]
        if size > self.max_bytes:  # larger than the whole cache: not kept
            return value
        self._main[key] = (value, size)
        self.held += size
        while self.held > self.max_bytes:
            old_key, (old, old_size) = self._main.popitem(last=False)
            self.held -= old_size
            self.evictions += 1
            self._spill_out(old_key, old, old_size)
        return value

    def _spill_out(self, key, value, size):
        device = _device(value)
        if self.spill_bytes <= 0 or device is None or device.type == "cpu" or size > self.spill_bytes:
            return
        self._spill[key] = (_to(value, "cpu"), size, device)
        self.spilled += size
        while self.spilled > self.spill_bytes:
            self.spilled -= self._spill.popitem(last=False)[1][1]

    def stats(self) -> dict:
        return {"entries": len(self), "held_mb": self.held / 2**20, "spilled_mb": self.spilled / 2**20,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
