"""A static-KV-cache decode loop whose per-token step can be captured as one CUDA graph.

Hugging Face's eager `generate` is launch-bound at batch 1 (hundreds of small kernel launches
per token from Python), so the weight-bandwidth savings of sparsity are invisible there. This
loop, in the spirit of gpt-fast, runs the model's own modules (embedding, norms, the 7
projections per block -- dense nn.Linear or RSparseLinear --, rotary embedding, lm_head) with a
preallocated KV cache, so that one decode step has static shapes and no host synchronisation:
on CUDA it is captured once as a graph and replayed per token, the step itself advancing the
position and writing the greedy token into a device buffer.

Prefill runs the same code on the whole prompt (dense: R-Sparse layers in "decode" mode treat
calls with more than one token per sequence as dense). Supported: Llama-family blocks as found
by rsparse.models (Llama, Mistral without sliding window beyond the sequence, Qwen2, Qwen3's
q/k norms), batch of prompts of equal length, greedy decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.models import decoder_blocks, decoder_linears


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StaticDecoder:
    """Greedy decoding with a static KV cache; `use_graph` captures the decode step on CUDA."""

    def __init__(self, model: nn.Module, max_seq_len: int, batch_size: int = 1, use_graph: bool | None = None):
        cfg = model.config
        self.model = model
        self.blocks = decoder_blocks(model)
        lin = decoder_linears(model)
        self.attn = [self._parent(model, l.name) for l in lin if l.kind == "q_proj"]
        self.mlp = [self._parent(model, l.name) for l in lin if l.kind == "gate_proj"]
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        shape = (batch_size, self.n_kv, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.graph = None
        # Static step state: current token, its position, and the generated-token buffer.
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=self.device)
        self.arange = torch.arange(max_seq_len, device=self.device)

    @staticmethod
    def _parent(model, name):
        return model.get_submodule(name.rpartition(".")[0])

    # -- the model, step by step ----------------------------------------------------------
    def _attention(self, i: int, h: torch.Tensor, cos, sin, positions: torch.Tensor, prefill: bool) -> torch.Tensor:
        attn = self.attn[i]
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache[i].index_copy_(2, positions, k)
        self.v_cache[i].index_copy_(2, positions, v)
        if prefill:
            kk, vv = k, v
            mask = None
        else:
            kk, vv = self.k_cache[i], self.v_cache[i]
            mask = (self.arange <= positions[-1]).view(1, 1, 1, -1)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=prefill and t > 1,
                                           scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp[i]
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, prefill: bool) -> torch.Tensor:
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions.unsqueeze(0).expand(ids.shape[0], -1))
        for i, block in enumerate(self.blocks):
            h = h + self._attention(i, block.input_layernorm(h), cos, sin, positions, prefill)
            h = h + self._mlp(i, block.post_attention_layernorm(h))
        return self.lm_head(self.norm(h[:, -1:]))[:, -1]

    def _step(self) -> None:
        """One decode step on static buffers: token at pos -> next token at pos+1."""
        logits = self._forward(self.token, self.pos, prefill=False)
        nxt = logits.argmax(-1, keepdim=True)
        self.pos.add_(1)
        self.out.index_copy_(1, self.pos, nxt)
        self.token.copy_(nxt)

    # -- public ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"decoder was built for batch {self.batch_size}, got {ids.shape[0]} prompts")
        t = ids.shape[1]
        if t >= self.max_seq_len:
            raise ValueError(f"prompt of {t} tokens does not fit max_seq_len={self.max_seq_len}")
        ids = ids.to(self.device)
        logits = self._forward(ids, self.arange[:t], prefill=True)
        self.out[:, :t] = ids
        self.pos.fill_(t)
        self.out[:, t] = logits.argmax(-1)
        self.token.copy_(self.out[:, t:t + 1])

    def _capture(self) -> None:
        pos, token, out = self.pos.clone(), self.token.clone(), self.out.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles Triton kernels, allocates scratch
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        # capture ran nothing for real, the warm-up did: restore the state it advanced
        self.pos.copy_(pos)
        self.token.copy_(token)
        self.out.copy_(out)

    @torch.no_grad()
    def decode(self, n_tokens: int) -> None:
        """Generate n_tokens greedily after prefill (no host synchronisation on CUDA)."""
        if n_tokens < 1:
            return
        # the last generated token is written at pos + n_tokens; the cache holds up to pos + n - 1
        if int(self.pos) + n_tokens >= self.max_seq_len:
            raise ValueError(f"{n_tokens} new tokens exceed max_seq_len={self.max_seq_len}")
        if self.use_graph and self.graph is None:
            self._capture()
        for _ in range(n_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: (batch, prompt + max_new_tokens) token ids, like HF generate."""
        self.prefill(ids)
        self.decode(max_new_tokens - 1)
        return self.out[:, : ids.shape[1] + max_new_tokens].clone()
