"""The decode engine: static KV cache, dense prefill, a (compiled) one-token step replayed as a
CUDA graph, sampling on the device.

Hugging Face's eager `generate` is launch-bound at batch 1 (hundreds of small kernel launches per
token, each costing more CPU time than the GPU needs for it), so the bytes that sparsity saves do
not show there. This engine runs the model's own modules (embedding, norms, the 7 projections
per block -- nn.Linear or RSparseLinear --, lm_head) in the spirit of gpt-fast:

- the KV cache is preallocated (`max_seq_len` slots per row), so a decode step has static shapes;
- prefill runs the whole (left-padded) prompt at once, dense, with PyTorch's SDPA;
- the decode step (one token per row: embedding, every block, lm_head, token choice, cache and
  position update) is captured once as a CUDA graph, then replayed per token; compiled, each
  block's part of it is one `torch.compile(fullgraph=True)` graph that all blocks share -- the
  R-Sparse kernel is a `torch.library` op (rsparse.runtime.ops), so Inductor fuses the
  elementwise glue around it, and for sparse layers the kernel's epilogue does SiLU x up and
  the residual add + next norm;
- the next token is chosen on the device (greedy, or temperature / top-k / top-p sampling from
  the seeded default generator), so the host never waits on the GPU except to stream tokens,
  which it does one step behind the GPU.

Rows finish at an end-of-sequence token (later tokens of that row are padding, dropped from the
result); generation stops when every row has finished or `max_new_tokens` are reached. On the
CPU everything runs eagerly (no compile, no graph), so the tests check the same logic.

Supported: the architectures rsparse.core.models accepts (Llama, Mistral, Qwen2, Qwen3 with q/k norms,
SmolLM; tied embeddings), dense, sparsified or loaded from a checkpoint, batch 1 to 8.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsparse.core.layer import RSparseLinear
from rsparse.core.models import decoder_blocks, decoder_linears
from rsparse.errors import EngineError
from rsparse.runtime.generation import Generation, deliver
from rsparse.runtime.fusion import fused_projections, gated_projections, projection_add_rmsnorm
from rsparse.runtime.ops import MAX_PARTS, decode_attention, eager_kernels, kernel_runs_on
from rsparse.runtime.sampling import Sampling, choose

__all__ = ["Engine", "EngineError", "Generation", "Sampling"]

MAX_BATCH = 8  # the decode kernel's row limit
MAX_EOS = 8  # end-of-sequence ids per engine call
# norms whose forward is weight * (h * rsqrt(mean(h^2) + eps)).to(dtype): the kernel's fused epilogue
LLAMA_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class BlockParts(NamedTuple):
    """What one block's step reads: its modules, its KV cache and the norms after its two halves."""

    attn: nn.Module
    mlp: nn.Module
    k_cache: torch.Tensor  # (B, kv heads, max_seq_len, head_dim)
    v_cache: torch.Tensor
    silu: bool  # the MLP's activation is SiLU (fusable into the gate/up kernel call)
    attn_norm: nn.Module  # after o_proj: the block's post-attention norm
    mlp_norm: nn.Module  # after down_proj: the next block's input norm, or the final norm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Engine:
    """Static-cache generation for one model. Build once, call `generate` many times.

    model: a causal LM rsparse.core.models accepts, on its device and dtype.
    batch_size: rows per step (1-8); fewer prompts are padded with finished dummy rows.
    max_seq_len: KV-cache slots per row (prompt + new tokens must fit; default: the model's
        context, capped at 2048). The attention kernel reads only the filled slots; SDPA reads
        all of them each step.
    compile / cuda_graph: default on CUDA, off elsewhere; compile may be a torch.compile
        backend, by name or callable ("inductor" when True; tests trace with "aot_eager").
        Compiled, each decode step runs one compiled graph per block, shared by all blocks.
    fuse: run the sparse q/k/v and gate/up projections of a decode step as one kernel call each,
        with SiLU x up, and the residual add + next RMSNorm after o_proj / down_proj, in the
        kernel calls' epilogues (False: every layer and step on its own).
    attention: decode attention, "kernel" (split-KV Triton kernel that reads only the visible
        slots: rsparse.runtime.kernels.decode_attention), "sdpa" (SDPA with a mask over every
        slot of the cache) or "auto" (the kernel on CUDA, SDPA elsewhere).
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_seq_len: int | None = None,
                 compile: bool | str | Callable | None = None, cuda_graph: bool | None = None, fuse: bool = True,
                 attention: str = "auto"):
        cfg = model.config
        if not 1 <= batch_size <= MAX_BATCH:
            raise EngineError(f"batch_size must be 1-{MAX_BATCH}, got {batch_size}")
        context = getattr(cfg, "max_position_embeddings", None) or 2048
        max_seq_len = max_seq_len or min(context, 2048)
        if max_seq_len > context:
            raise EngineError(f"max_seq_len {max_seq_len} exceeds the model's context of {context} tokens")
        self.model = model
        self.blocks = decoder_blocks(model)
        linears = decoder_linears(model)  # raises UnsupportedModelError for other architectures
        attns = [model.get_submodule(l.name.rpartition(".")[0]) for l in linears if l.kind == "q_proj"]
        mlps = [model.get_submodule(l.name.rpartition(".")[0]) for l in linears if l.kind == "gate_proj"]
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = getattr(attns[0], "scaling", None) or 1.0 / math.sqrt(self.head_dim)
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        self.window = int(window) if window else None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch_size, self.max_seq_len, self.fuse = batch_size, max_seq_len, fuse
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise EngineError("cuda_graph needs the model on a CUDA device")
        if attention not in ("auto", "kernel", "sdpa"):
            raise EngineError(f"attention must be auto, kernel or sdpa, got {attention!r}")
        if attention == "kernel" and not kernel_runs_on(self.device):
            raise EngineError(f"the attention kernel needs triton and a CUDA device, not {self.device}")
        self.attention_kernel = attention == "kernel" or (attention == "auto" and on_cuda and kernel_runs_on(self.device))

        dev, b, s = self.device, batch_size, max_seq_len
        shape = (b, self.n_kv, s, self.head_dim)
        self.parts = []  # what each block's step reads (its modules and cache), in order
        for i, (block, attn, mlp) in enumerate(zip(self.blocks, attns, mlps)):
            following = self.blocks[i + 1].input_layernorm if i + 1 < len(self.blocks) else base.norm
            self.parts.append(BlockParts(attn, mlp, torch.zeros(shape, device=dev, dtype=self.dtype),
                                         torch.zeros(shape, device=dev, dtype=self.dtype),
                                         type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"),
                                         block.post_attention_layernorm, following))
        # rotary tables for every position, computed once by the model's own rotary module
        positions = torch.arange(s, device=dev)
        with torch.no_grad():
            cos, sin = base.rotary_emb(self.parts[0].k_cache, positions[None])
        self.cos, self.sin = cos[0], sin[0]  # (S, head_dim)
        self.slots = positions
        # decode-step state, static buffers: the graph reads and advances them
        self.token = torch.zeros(b, 1, dtype=torch.long, device=dev)  # last chosen token per row
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot of that token
        self.pad = torch.zeros(b, dtype=torch.long, device=dev)  # left padding per row
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)  # row has finished
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=dev)  # end-of-sequence ids (-1: unused)
        self.pad_token = torch.zeros((), dtype=torch.long, device=dev)  # emitted by finished rows
        self.temperature = torch.ones((), device=dev)
        self.top_p = torch.ones((), device=dev)
        self._step_fns: dict = {}  # sampling mode -> step callable (compiled and/or graph)
        backend = "inductor" if self.compile is True else self.compile
        self._decode_block, self._advance = self._block, self._advance_state
        if self.compile:
            # dynamo keeps a compiled block per distinct block shape (a searched recipe's per-layer
            # ranks make each block distinct) and per model: allow many
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # One block at a time: every block of the same structure reuses one compiled graph
            # (dynamo takes the modules' parameters and the cache as inputs), so the warm-up
            # compiles one block instead of the whole step. The step is captured as one CUDA
            # graph either way, and the kernels' epilogues already fuse across block borders.
            self._decode_block = torch.compile(self._block, fullgraph=True, dynamic=False, backend=backend)
            self._advance = torch.compile(self._advance_state, fullgraph=True, dynamic=False, backend=backend)

    # -- the model ------------------------------------------------------------------------
    def _attention(self, part: BlockParts, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, write_at: torch.Tensor, prefill: bool) -> torch.Tensor:
        """mask: prefill, SDPA's mask (None: causal); decode, SDPA's mask over the cache, or with
        the attention kernel the first visible slot of each row (the last is write_at)."""
        attn, k_cache, v_cache = part.attn, part.k_cache, part.v_cache
        b, t, _ = h.shape
        q, k, v = self._project(h, (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = q.view(b, t, -1, self.head_dim), k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache.index_copy_(2, write_at, k)
        v_cache.index_copy_(2, write_at, v)
        if prefill or not self.attention_kernel:
            # SDPA over the whole cache when decoding (cuDNN's kernel on the H200, ~10 us per 7B
            # block at 640 slots; plain matmuls and flex_attention measured 4% and 17% slower)
            kk, vv = (k, v) if prefill else (k_cache, v_cache)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=prefill and mask is None,
                                               scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        else:
            o = decode_attention(q, k_cache, v_cache, mask, write_at, self.scale)
        return o.transpose(1, 2).reshape(b, t, -1)  # o_proj's input

    def _mlp(self, part: BlockParts, h: torch.Tensor) -> torch.Tensor:
        """down_proj's input: act(gate) * up (SiLU: in the gate/up kernel call's epilogue)."""
        mlp = part.mlp
        if part.silu and self._fusable(h, (mlp.gate_proj, mlp.up_proj)):
            return gated_projections(h, mlp.gate_proj, mlp.up_proj)
        gate, up = self._project(h, (mlp.gate_proj, mlp.up_proj))
        return mlp.act_fn(gate) * up

    def _fusable(self, h: torch.Tensor, layers) -> bool:
        """Whether each layer is one kernel call on h (a sparse decode step), fusion allowed."""
        fusable = self.fuse
        for layer in layers:  # a plain loop: dynamo traces it without a graph break
            fusable = (fusable and isinstance(layer, RSparseLinear) and layer.runs_kernel(h)
                       and layer.weight_bits == layers[0].weight_bits)  # one kernel per call: one width
        return fusable

    def _project(self, h: torch.Tensor, layers) -> list[torch.Tensor]:
        """Projections that share the input h: one fused kernel call for sparse decode steps
        (q/k/v, gate/up), else each layer on its own."""
        if 2 <= len(layers) <= MAX_PARTS and self._fusable(h, layers):
            return fused_projections(h, layers)
        return [layer(h) for layer in layers]

    def _add_norm(self, layer, a: torch.Tensor, h: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + layer(a), norm(h + layer(a))): in the layer's kernel call for sparse decode steps
        when the norm is a Llama-style RMSNorm in the model's dtype."""
        if (type(norm).__name__ in LLAMA_RMSNORMS and norm.weight.dtype == self.dtype
                and self._fusable(a, (layer,))):
            return projection_add_rmsnorm(a, layer, h, norm)
        h = h + layer(a)
        return h, norm(h)

    def _block(self, part: BlockParts, h, x, cos, sin, mask, write_at, prefill: bool):
        """One block: (h, x) -> (h, x), with h the residual stream and x = norm(h) the next
        projections' input. Its o_proj and down_proj outputs go through _add_norm, which adds
        them to h and applies the following norm (the next block's input norm after down_proj)."""
        a = self._attention(part, x, cos, sin, mask, write_at, prefill)
        h, x = self._add_norm(part.attn.o_proj, a, h, part.attn_norm)
        return self._add_norm(part.mlp.down_proj, self._mlp(part, x), h, part.mlp_norm)

    def _blocks(self, h, cos, sin, mask, write_at, prefill):
        """Logits (B, V) at the last position; decode steps run the (compiled) _decode_block."""
        block = self._block if prefill else self._decode_block
        x = self.blocks[0].input_layernorm(h)
        for part in self.parts:
            h, x = block(part, h, x, cos, sin, mask, write_at, prefill)
        return self.lm_head(x[:, -1:])[:, -1]

    def _decode_logits(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after the token at cache slot `pos` (one token per row)."""
        rope_pos = (pos - self.pad).clamp(min=0)  # left-padded rows start their positions later
        cos, sin = self.cos[rope_pos][:, None, None], self.sin[rope_pos][:, None, None]
        if self.attention_kernel:  # the kernel takes the visible range [first, pos] per row
            first = self.pad if not self.window else torch.maximum(self.pad, pos - self.window + 1)
            return self._blocks(self.embed(token), cos, sin, first, pos, prefill=False)
        visible = (self.slots <= pos) & (self.slots[None] >= self.pad[:, None])
        if self.window:
            visible = visible & (self.slots > pos - self.window)
        return self._blocks(self.embed(token), cos, sin, visible[:, None, None], pos, prefill=False)

    def _prefill_logits(self, ids: torch.Tensor, pad: torch.Tensor, padded: bool) -> torch.Tensor:
        """Logits (B, V) after the prompt ids (B, T), row b left-padded by pad[b] tokens."""
        t = ids.shape[1]
        slots = self.slots[:t]
        rope_pos = (slots[None] - pad[:, None]).clamp(min=0)
        cos, sin = self.cos[rope_pos][:, None], self.sin[rope_pos][:, None]
        if not padded and not self.window:  # plain causal attention: SDPA's fastest kernels
            return self._blocks(self.embed(ids), cos, sin, None, slots, prefill=True)
        causal = slots[:, None] >= slots[None]
        if self.window:
            causal = causal & (slots[:, None] - slots[None] < self.window)
        mask = causal[None] & (slots[None, None] >= pad[:, None, None])
        # padding queries see only themselves (their output is never used; this keeps it finite)
        mask = (mask | torch.eye(t, dtype=torch.bool, device=ids.device)[None])[:, None]
        return self._blocks(self.embed(ids), cos, sin, mask, slots, prefill=True)

    # -- choosing the next token ------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        return choose(logits, sampling, self.temperature, self.top_p)

    def _advance_state(self, nxt: torch.Tensor) -> None:
        nxt = torch.where(self.done, self.pad_token, nxt)
        self.done |= (nxt[:, None] == self.eos[None]).any(-1)
        self.token.copy_(nxt[:, None])
        self.pos.add_(1)

    def _step(self, sampling: Sampling) -> None:
        self._advance(self._choose(self._decode_logits(self.token, self.pos), sampling))

    def _step_fn(self, sampling: Sampling) -> Callable[[], None]:
        """The decode step for this sampling mode: on CUDA a captured graph (compiled on first use)."""
        key = (sampling.greedy, sampling.top_k, sampling.top_p < 1)
        if key in self._step_fns:
            return self._step_fns[key]
        if not self.cuda_graph:
            fn = lambda: self._step(sampling)  # noqa: E731
        else:
            # called before prefill, which rewrites the cache slots the warm-up writes; the
            # request's state is put back after the warm-up steps (which may finish rows)
            saved = [buf.clone() for buf in (self.token, self.pos, self.done)]
            self.pos.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            # eager_kernels: without torch.compile, the warm-up must run (and so compile and
            # allocate for) the kernels that the capture records
            with eager_kernels():
                with torch.cuda.stream(stream):  # warm-up: compiles, allocates kernel scratch
                    for _ in range(3):
                        self._step(sampling)
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    self._step(sampling)
            for buf, value in zip((self.token, self.pos, self.done), saved):
                buf.copy_(value)
            fn = graph.replay
        self._step_fns[key] = fn
        return fn

    # -- public -----------------------------------------------------------------------------
    def _setup(self, rows: list[list[int]], max_new_tokens: int, sampling: Sampling, eos_token_id) -> list[int]:
        """Check a request and write its per-row state (padding, finished rows, EOS ids, sampling)."""
        n = len(rows)
        if not 1 <= n <= self.batch_size:
            raise EngineError(f"this engine takes 1-{self.batch_size} prompts per call, got {n}")
        if any(len(r) == 0 for r in rows):
            raise EngineError("a prompt is empty: give at least one token")
        vocab = self.embed.num_embeddings
        if any(not 0 <= tok < vocab for r in rows for tok in r):  # on CUDA a bad id is a device assert
            raise EngineError(f"a prompt holds a token id outside the model's vocabulary of {vocab}")
        if max_new_tokens < 1:
            raise EngineError("max_new_tokens must be at least 1")
        t = max(len(r) for r in rows)
        # the last token is chosen at slot t + max_new_tokens - 1 and never written to the cache
        if t + max_new_tokens - 1 > self.max_seq_len:
            raise EngineError(f"a prompt of {t} tokens plus {max_new_tokens} new tokens does not fit the engine's "
                              f"cache of {self.max_seq_len} tokens (shorten the prompt or ask for fewer tokens)")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if len(eos) > MAX_EOS:
            raise EngineError(f"at most {MAX_EOS} end-of-sequence ids, got {len(eos)}")
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, device=self.device)
        self.pad_token.fill_(eos[0] if eos else 0)
        # left-pad; unused rows repeat the first prompt and start finished
        rows_all = rows + [rows[0]] * (self.batch_size - n)
        self.pad.copy_(torch.tensor([t - len(r) for r in rows_all], device=self.device))
        self.done.copy_(torch.arange(self.batch_size, device=self.device) >= n)
        if not sampling.greedy:
            self.temperature.fill_(sampling.temperature)
            self.top_p.fill_(sampling.top_p)
        return eos

    def _prefill(self, rows: list[list[int]], sampling: Sampling) -> None:
        """Fill the cache with the (left-padded) prompts and choose each row's first token."""
        t = max(len(r) for r in rows)
        pad_id = int(self.pad_token)
        rows_all = rows + [rows[0]] * (self.batch_size - len(rows))
        ids = torch.tensor([[pad_id] * (t - len(r)) + r for r in rows_all], device=self.device)
        logits = self._prefill_logits(ids, self.pad, padded=any(len(r) < t for r in rows_all))
        self.pos.fill_(t - 1)  # the slot of the last prompt token
        self._advance_state(self._choose(logits, sampling))

    @torch.no_grad()
    def forced_choices(self, prompt: Sequence[int], forced: Sequence[int]) -> list[int]:
        """Greedy choices along a given continuation (teacher forcing): the engine's token after
        the prompt, then after each token of `forced` in turn (len(forced) + 1 choices).

        Checked against another implementation's greedy tokens this separates numerics from
        bugs: a wrong step disagrees almost everywhere, while last-bit differences change a
        choice only at a near-tie, without compounding as a free-running continuation does.
        """
        rows = [list(map(int, prompt))]
        forced = [int(t) for t in forced]
        self._setup(rows, len(forced) + 1, Sampling(), None)
        step = self._step_fn(Sampling())
        self._prefill(rows, Sampling())
        choices = [int(self.token[0, 0])]
        for tok in forced:
            self.token[0, 0] = tok  # the step reads the token to feed from this buffer
            step()
            choices.append(int(self.token[0, 0]))
        return choices

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
                 sampling: Sampling = Sampling(), eos_token_id: int | Sequence[int] | None = None,
                 on_tokens: Callable[[list[int | None]], bool | None] | None = None) -> Generation:
        """Continue each prompt (token ids) by up to max_new_tokens tokens.

        on_tokens(step) is called with the new token of every prompt after each step (None for a
        finished row), in order, at most one step behind the GPU; returning True stops early.
        """
        rows = [list(map(int, p)) for p in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
        n = len(rows)
        eos = self._setup(rows, max_new_tokens, sampling, eos_token_id)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        warm = time.perf_counter()
        step = self._step_fn(sampling)  # compiled and captured before the clock starts
        warm = time.perf_counter() - warm
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

        sync()
        t0 = time.perf_counter()
        self._prefill(rows, sampling)
        first = self.token[:n, 0].tolist()  # waits for prefill
        t1 = time.perf_counter()

        out = [[tok] for tok in first]
        live = [tok not in eos for tok in first]
        stop = bool(on_tokens(first)) if on_tokens else False
        steps = 0
        pending = None  # (host copy, event) of the step the GPU may still be running
        host = torch.empty((max_new_tokens, self.batch_size), dtype=torch.long,
                           pin_memory=self.device.type == "cuda")
        while not stop and any(live) and steps < max_new_tokens - 1:
            step()
            host[steps].copy_(self.token[:, 0], non_blocking=True)
            event = torch.cuda.Event() if self.device.type == "cuda" else None
            if event is not None:
                event.record()
            steps += 1
            if pending is not None:
                stop = deliver(*pending, out, live, eos, on_tokens)
            pending = (host[steps - 1], event)
        if pending is not None and not stop:
            deliver(*pending, out, live, eos, on_tokens)
        sync()
        t2 = time.perf_counter()
        return Generation(tokens=out, prompt_lengths=[len(r) for r in rows], prefill_seconds=t1 - t0,
                          decode_seconds=t2 - t1, decode_steps=steps, warmup_seconds=warm,
                          finished=[not alive for alive in live])
