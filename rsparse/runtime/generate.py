"""Text generation with sparsified models: what `rsparse generate` and `rsparse chat` run (their
flags, and the checks of those flags, are in rsparse.cli.generate).

    model, tok = load_for_generation("out/smollm-50")                         # a checkpoint, as saved
    model, tok = load_for_generation(None, RSparseConfig(sparsity=0.5))      # sparsified on the fly
    text, stats = generate(model, tok, "What is the capital of France?", max_new_tokens=32)
    chat(model, tok)                                                          # stdin lines; /reset, /exit

The model is an rsparse checkpoint (`rsparse compress`, rsparse.save_pretrained), used as saved,
or anything rsparse.core.models.load_model accepts, sparsified on the fly (calibration, which
takes minutes on a CPU for a real model) or left dense. Decoding is sparse: in the default token
mode "decode" the prompt (prefill) runs dense and every generation step runs the R-Sparse layers.
Tokens stream to stdout as they are generated; timings go to stderr.

engine="rsparse" generates with the decode engine (rsparse.runtime.engine: static KV cache,
decode step replayed as a CUDA graph on CUDA, compiled too with compile=True); engine="hf" with
transformers' `generate` (the reference).
"""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO

import torch

from rsparse.core.config import RSparseConfig
from rsparse.core.data import DataConfig
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import BadInputError
from rsparse.runtime.sampling import Sampling


def load_for_generation(name: str | None, config: RSparseConfig | None = None, *, dense: bool = False,
                        tokens: str = "decode", calib_corpus: str = DataConfig.calibration_corpus,
                        max_new_tokens: int | None = None, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) of `name` (None: the embedded model), ready to generate.

    A checkpoint is used as saved, its layers in token mode `tokens` (dense=True: its dense layers
    back). Any other model is sparsified under `config` (calibrated on config.calibration_samples
    windows of config.seq_len tokens of calib_corpus), or left dense without one. The model's
    context (against max_new_tokens and config.seq_len) and the recipe are checked against its
    config before its weights load; the prompt's length is known only later (check_context)."""
    from rsparse.core.config import layer_budgets
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, check_seq_len, context_length, model_spec
    from rsparse.io.checkpoint import is_checkpoint, load_any
    from rsparse.methods import restore_, sparsify_

    checkpoint = is_checkpoint(name)
    if config is not None and (checkpoint or dense):
        raise BadInputError(f"{name} is an rsparse checkpoint, already sparsified: pass no config" if checkpoint
                            else "dense and a config exclude each other")
    spec = model_spec(name)
    limit = context_length(spec)
    if max_new_tokens is not None and limit is not None and max_new_tokens >= limit:
        raise BadInputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                            f"context of {limit} tokens: use at most {limit - 1}")
    if config is not None:
        if config.recipe is not None:
            layer_budgets(config, spec.linears)
        check_seq_len(spec, config.seq_len)

    start = time.time()
    model, tokenizer = load_any(name, device=device, dtype=dtype)
    name = name or DEFAULT_MODEL_NAME
    if checkpoint:
        if dense:
            restore_(model)
        else:
            set_token_mode(model, tokens)
        what = "dense" if not rsparse_layers(model) else f"{len(rsparse_layers(model))} R-Sparse layers"
        print(f"model: {name} (rsparse checkpoint, {what}; loaded in {time.time() - start:.1f} s)", file=sys.stderr)
    elif config is not None:
        print(f"model: {name}; sparsifying on the fly at {100 * config.sparsity:.0f}% (calibrating on "
              f"{config.calibration_samples} x {config.seq_len} tokens of {calib_corpus}; this takes a while on a "
              "CPU: save a checkpoint once with `rsparse compress`, or pass --dense)", file=sys.stderr)
        calib = load_windows(tokenizer, calib_corpus, config.seq_len, config.calibration_samples, "calibration",
                             config.seed)
        sparsify_(model, config, calib)
        print(f"sparsified in {time.time() - start:.0f} s", file=sys.stderr)
    else:
        print(f"model: {name} (dense)", file=sys.stderr)
    if tokenizer is None:
        raise BadInputError(f"{name} has no tokenizer")
    return model, tokenizer


def check_context(model, ids: torch.Tensor, max_new_tokens: int) -> None:
    """A prompt that does not fit the context window gave a blank answer after a warning."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] + max_new_tokens > limit:
        raise BadInputError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                            f"the model's context of {limit} tokens: shorten the prompt or lower --max-new-tokens")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, messages: list[dict], chat_template: bool) -> torch.Tensor:
    """Token ids (1, T) of a conversation: the chat template with a generation prompt, or for a
    plain model the text itself (one user message) or a "User:/Assistant:" transcript."""
    if chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        text = turns[0]["content"]
    else:
        names = {"user": "User", "assistant": "Assistant"}
        text = "".join(f"{names[m['role']]}: {m['content']}\n" for m in turns) + "Assistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def _streamer(tokenizer):
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """TextStreamer that records when the first generated token arrived (end of prefill)."""

        first_token_at: float | None = None
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.prompt_seen = True
            super().put(value)

    return TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def eos_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence tokens: the generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def generation_kwargs(model, tokenizer, max_new_tokens: int, sampling: Sampling = Sampling()) -> dict:
    """transformers' generate arguments for a request."""
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": not sampling.greedy}
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    eos = eos_ids(model, tokenizer)
    if eos:
        kwargs["eos_token_id"] = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


@torch.no_grad()
def stream_generate(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                    stops: Sequence[str] = ()) -> tuple[str, dict]:
    """Generate with transformers, tokens streamed to stdout; returns (new text, timing stats).
    Generation ends at an end-of-sequence token or once the new text contains one of `stops`
    (the text returned ends before it; the stream has shown it)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    streamer = _streamer(tokenizer)
    extra = {"stopping_criteria": _stop_criteria(tokenizer, input_ids.shape[1], stops)} if stops else {}
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                         **generation_kwargs(model, tokenizer, max_new_tokens, sampling), **extra)
    t1 = time.perf_counter()
    new = out[0, input_ids.shape[1]:]
    first = streamer.first_token_at or t1
    stats = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": int(new.numel()), "seconds": t1 - t0,
             "prefill_seconds": first - t0, "tokens_per_s": new.numel() / max(t1 - t0, 1e-9),
             "decode_tokens_per_s": (new.numel() - 1) / (t1 - first) if new.numel() > 1 and t1 > first else None}
    return cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stops), stats


def _has_stop(tokenizer, new_tokens: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of the new tokens contains a stop text. Only the tail is decoded: a
    character takes at most 4 byte-level tokens, so 4 per character (+4) cover the longest stop."""
    if not stops:
        return False
    tail = new_tokens[-(4 * max(map(len, stops)) + 4):]
    text = tokenizer.decode(tail, skip_special_tokens=True)
    return any(stop in text for stop in stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """text up to the first stop text in it (all of it if none occurs)."""
    return text[:min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))]


def _stop_criteria(tokenizer, prompt_len: int, stops: Sequence[str]):
    """transformers stopping criteria for _has_stop (batch 1: the rows of generate's input)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [_has_stop(tokenizer, row[prompt_len:].tolist(), stops) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def make_engine(model, max_seq_len: int, compile: bool = False):
    """The decode engine (captured, and with compile=True compiled, on first use)."""
    from rsparse.runtime.engine import Engine

    context = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    # Not compiled unless asked: a one-shot answer or a chat turn pays the warm-up in full. On a
    # 7B shape (H200, bf16) the compiled step decodes R-Sparse 50% at 304 tok/s after ~9 s of
    # warm-up in a fresh process, the graph alone at 246 tok/s after ~1 s: compiling gains
    # 0.8 ms per token, about 10k tokens to repay it (docs/decode-engine.md).
    # compile=None: the engine's default (compiled on CUDA, eager elsewhere).
    return Engine(model, max_seq_len=min(context, max_seq_len), compile=None if compile else False)


@torch.no_grad()
def engine_generate(engine, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                    stops: Sequence[str] = ()) -> tuple[str, dict]:
    """Like stream_generate, with the decode engine."""
    streamer = _streamer(tokenizer)
    streamer.put(input_ids[0])
    new: list[int] = []

    def on_tokens(step):
        if step[0] is None:  # finished (end-of-sequence) rows yield None
            return True
        new.append(step[0])
        streamer.put(torch.tensor([step[0]]))
        return _has_stop(tokenizer, new, stops)

    t0 = time.perf_counter()
    result = engine.generate([input_ids[0].tolist()], max_new_tokens, sampling,
                             eos_token_id=eos_ids(engine.model, tokenizer), on_tokens=on_tokens)
    streamer.end()
    tokens = result.tokens[0]
    stats = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": len(tokens),
             "seconds": time.perf_counter() - t0 - result.warmup_seconds, "prefill_seconds": result.prefill_seconds,
             "tokens_per_s": len(tokens) / max(result.prefill_seconds + result.decode_seconds, 1e-9),
             "decode_tokens_per_s": result.decode_tokens_per_s, "warmup_seconds": result.warmup_seconds}
    return cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops), stats


def print_stats(stats: dict) -> None:
    decode = stats["decode_tokens_per_s"]
    warm = stats.get("warmup_seconds") or 0
    print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s; "
          f"prefill {stats['prompt_tokens']} tokens {1e3 * stats['prefill_seconds']:.1f} ms"
          + (f", decode {decode:.1f} tokens/s" if decode is not None else "")
          + (f"; engine warm-up {warm:.1f} s" if warm >= 0.05 else "") + "]", file=sys.stderr, flush=True)


def generate(model, tokenizer, prompt: str, *, system: str | None = None, chat_template: bool = True,
             max_new_tokens: int = 128, sampling: Sampling = Sampling(), stops: Sequence[str] = (),
             engine: str = "hf", compile: bool = False) -> tuple[str, dict]:
    """One answer to `prompt`, streamed to stdout: (its text, timing stats). chat_template: use
    the tokenizer's chat template when it has one (with the `system` message); otherwise the
    prompt is fed as is. engine: "hf" (transformers' generate) or "rsparse" (the decode engine)."""
    template = chat_template and has_chat_template(tokenizer)
    messages = ([{"role": "system", "content": system}] if system and template else []) + \
        [{"role": "user", "content": prompt}]
    ids = encode(tokenizer, messages, template)
    check_context(model, ids, max_new_tokens)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    if engine == "rsparse":
        # cache sized to the request (attention reads every slot), in steps of 256 to reuse compiled code
        runner = make_engine(model, -(-(ids.shape[1] + max_new_tokens) // 256) * 256, compile)
        return engine_generate(runner, tokenizer, ids, max_new_tokens, sampling, stops)
    return stream_generate(model, tokenizer, ids, max_new_tokens, sampling, stops)


def chat(model, tokenizer, *, stdin: TextIO | None = None, system: str | None = None, chat_template: bool = True,
         max_new_tokens: int = 128, sampling: Sampling = Sampling(), stops: Sequence[str] = (),
         engine: str = "hf", compile: bool = False) -> None:
    """An interactive chat on stdin (one message a line; /reset clears the history, /exit or the
    end of input quits), each reply streamed to stdout and its timings to stderr. The oldest
    exchanges are dropped while the history and a reply would not fit the context."""
    stdin = stdin or sys.stdin
    template = chat_template and has_chat_template(tokenizer)
    start = [{"role": "system", "content": system}] if system and template else []
    # a plain transcript (no chat template) would go on to write the user's next turn
    stops = list(stops) + ([] if template else ["\nUser:"])
    history = list(start)
    limit = getattr(model.config, "max_position_embeddings", None)
    runner = make_engine(model, 2048, compile) if engine == "rsparse" else None
    if runner is not None:
        limit = runner.max_seq_len
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    print("chat: type a message; /reset clears the history, /exit or end of input quits", file=sys.stderr)
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            print(file=sys.stderr)
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        ids = encode(tokenizer, history, template)
        # Drop the oldest exchanges while the prompt and the reply would not fit the context.
        while limit and ids.shape[1] + max_new_tokens > limit and len(history) > len(start) + 1:
            del history[len(start):len(start) + 2]
            ids = encode(tokenizer, history, template)
        if runner is not None:
            reply, stats = engine_generate(runner, tokenizer, ids, max_new_tokens, sampling, stops)
        else:
            reply, stats = stream_generate(model, tokenizer, ids, max_new_tokens, sampling, stops)
        history.append({"role": "assistant", "content": reply.strip()})
        print_stats(stats)
