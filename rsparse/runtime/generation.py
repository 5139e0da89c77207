"""The caller's side of Engine.generate: the Generation it returns (new tokens per prompt, and
where the time went), and the hand-over of each decode step's tokens to the caller once the GPU
has produced them (the engine runs one step ahead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """The result of Engine.generate: new tokens per prompt and where the time went."""

    tokens: list[list[int]]  # new tokens per prompt (an end-of-sequence token included)
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float  # first token to last, excluding prefill and warm-up
    decode_steps: int  # one-token steps run after prefill (each adds a token to every live row)
    warmup_seconds: float = 0.0  # compile + graph capture, paid once per engine and sampling mode
    finished: list[bool] = field(default_factory=list)  # ended at an end-of-sequence token

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Steps per second of the decode loop (tokens per second per row)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else None


def deliver(host: torch.Tensor, event, out, live, eos, on_tokens) -> bool:
    """Hand one step's tokens to the caller once the GPU has produced them; True: stop."""
    if event is not None:
        event.synchronize()
    step = []
    for row, tok in enumerate(host.tolist()[: len(out)]):
        if live[row]:
            out[row].append(tok)
            live[row] = tok not in eos
            step.append(tok)
        else:
            step.append(None)
    return bool(on_tokens(step)) if on_tokens else False
