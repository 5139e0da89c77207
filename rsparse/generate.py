"""Text generation with sparsified models: the library side of `rsparse generate` and `rsparse chat`
(their flags are in rsparse.cli.generate).

The model is an rsparse checkpoint (rsparse.io.checkpoint.save / `rsparse compress`), used as
saved, or anything rsparse.core.models.load_model accepts, sparsified on the fly (calibration, which
takes minutes on a CPU for a real model) unless --dense. Decoding is sparse: with the default
token mode "decode" the prompt (prefill) runs dense and every generation step runs the R-Sparse
layers. Tokens stream to stdout as they are generated; timings go to stderr.

On CUDA the decode engine (rsparse.runtime.engine: static KV cache, decode step replayed as a
CUDA graph; compiled too with `--compile on`) generates by default; `--engine hf` uses
transformers' `generate` instead (the reference; the default on other devices).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch

from rsparse.core.config import RSparseConfig
from rsparse.core.data import DataConfig
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import BadInputError

# Sparsification flags that only apply when the model is not already a checkpoint; their
# defaults (applied when unset) are those of RSparseConfig and DataConfig, as for `rsparse compress`.
_SPARSIFY_DEFAULTS = {"sparsity": RSparseConfig.sparsity, "ratio": RSparseConfig.ratio, "recipe": None,
                      "calib_corpus": DataConfig.calibration_corpus,
                      "calib_samples": RSparseConfig.calibration_samples, "seq_len": RSparseConfig.seq_len}


def _validate(args: argparse.Namespace) -> None:
    if args.engine == "auto":
        args.engine = "rsparse" if str(args.device).startswith("cuda") else "hf"
    if args.compile is not None and args.engine != "rsparse":
        raise BadInputError(f"--compile applies to the rsparse engine, not to --engine {args.engine} "
                            "(the rsparse engine is the default on CUDA)")
    if args.compile == "on" and not str(args.device).startswith("cuda"):
        raise BadInputError(f"--compile on needs a CUDA device, not {args.device} (elsewhere the engine runs eagerly)")
    if args.max_new_tokens < 1:
        raise BadInputError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise BadInputError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise BadInputError("--prompt is empty: give the text to continue or answer")
    if any(not text for text in getattr(args, "stop", None) or ()):
        raise BadInputError("--stop is empty: give the text that ends generation")
    for flag in ("prompt", "system"):
        try:  # bytes that are not UTF-8 reach argv as lone surrogates, which the tokenizer rejects
            (getattr(args, flag, None) or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadInputError(f"--{flag} is not valid UTF-8 (a bad byte at character {e.start}): "
                                "pass UTF-8 text") from None
    from rsparse.core.models import check_device

    check_device(args.device)


def _check_context(model, ids, max_new_tokens: int) -> None:
    """A prompt that does not fit the context window gave a blank answer after a warning."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] + max_new_tokens > limit:
        raise BadInputError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                            f"the model's context of {limit} tokens: shorten the prompt or lower --max-new-tokens")


def prepare_model(args: argparse.Namespace):
    """Load (checkpoint or not), sparsify on the fly when asked; returns (model, tokenizer)."""
    from rsparse.io.checkpoint import is_checkpoint, load_any
    from rsparse.methods import restore_, sparsify_
    from rsparse.core.config import layer_budgets
    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, check_seq_len, context_length, model_spec

    checkpoint = is_checkpoint(args.model)
    given = [k for k in _SPARSIFY_DEFAULTS if getattr(args, k, None) is not None]
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if given and checkpoint:
        raise BadInputError(f"{args.model} is an rsparse checkpoint, already sparsified; {flags} only apply to "
                         "models that are not (use --dense to run it dense)")
    if given and args.dense:
        raise BadInputError(f"--dense and {flags} exclude each other")
    opts = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in _SPARSIFY_DEFAULTS.items()}
    config = None
    if not checkpoint and not args.dense:
        # validate before loading anything
        config = RSparseConfig(sparsity=opts["sparsity"], ratio=opts["ratio"], recipe=opts["recipe"],
                               tokens=args.tokens, calibration_samples=opts["calib_samples"],
                               seq_len=opts["seq_len"], seed=args.seed)
    # the limits and the recipe against the model's config, before its weights load (the
    # prompt's length is known only after tokenizing: _check_context)
    spec = model_spec(args.model)
    limit = context_length(spec)
    if limit is not None and args.max_new_tokens >= limit:
        raise BadInputError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                            f"context of {limit} tokens: use at most {limit - 1}")
    if config is not None:
        if config.recipe is not None:
            layer_budgets(config, spec.linears)
        check_seq_len(spec, config.seq_len)

    start = time.time()
    model, tokenizer = load_any(args.model, device=args.device, dtype=args.dtype)
    name = args.model or DEFAULT_MODEL_NAME
    if checkpoint:
        if args.dense:
            restore_(model)
        else:
            set_token_mode(model, args.tokens)
        what = "dense" if not rsparse_layers(model) else f"{len(rsparse_layers(model))} R-Sparse layers"
        print(f"model: {name} (rsparse checkpoint, {what}; loaded in {time.time() - start:.1f} s)", file=sys.stderr)
    elif config is not None:
        print(f"model: {name}; sparsifying on the fly at {100 * config.sparsity:.0f}% (calibrating on "
              f"{opts['calib_samples']} x {opts['seq_len']} tokens of {opts['calib_corpus']}; this takes a while on a "
              "CPU: save a checkpoint once with `rsparse compress`, or pass --dense)", file=sys.stderr)
        calib = load_windows(tokenizer, opts["calib_corpus"], opts["seq_len"], opts["calib_samples"], "calibration",
                             args.seed)
        sparsify_(model, config, calib)
        print(f"sparsified in {time.time() - start:.0f} s", file=sys.stderr)
    else:
        print(f"model: {name} (dense)", file=sys.stderr)
    if tokenizer is None:
        raise BadInputError(f"{name} has no tokenizer")
    return model, tokenizer


def uses_chat_template(tokenizer, args: argparse.Namespace) -> bool:
    return not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))


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


def generation_kwargs(model, tokenizer, args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if eos:
        kwargs["eos_token_id"] = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


@torch.no_grad()
def stream_generate(model, tokenizer, input_ids: torch.Tensor, args: argparse.Namespace,
                    stops: Sequence[str] = ()) -> tuple[str, dict]:
    """Generate with tokens streamed to stdout; returns (new text, timing stats). Generation ends
    at an end-of-sequence token or once the new text contains one of `stops` (the text returned
    ends before it; the stream has shown it)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    streamer = _streamer(tokenizer)
    extra = {"stopping_criteria": _stop_criteria(tokenizer, input_ids.shape[1], stops)} if stops else {}
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                         **generation_kwargs(model, tokenizer, args), **extra)
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


def eos_ids(model, tokenizer) -> list[int]:
    return generation_kwargs(model, tokenizer, argparse.Namespace(max_new_tokens=1, temperature=0)).get("eos_token_id", [])


def make_engine(model, tokenizer, args: argparse.Namespace, max_seq_len: int):
    """The decode engine for `--engine rsparse` (captured, and with --compile on compiled, on first use)."""
    from rsparse.runtime.engine import Engine

    context = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    # Not compiled unless asked: a one-shot answer or a chat turn pays the warm-up in full. On a
    # 7B shape (H200, bf16) the compiled step decodes R-Sparse 50% at 304 tok/s after ~9 s of
    # warm-up in a fresh process, the graph alone at 246 tok/s after ~1 s: compiling gains
    # 0.8 ms per token, about 10k tokens to repay it (docs/decode-engine.md).
    # compile=None: the engine's default (compiled on CUDA, eager elsewhere).
    return Engine(model, max_seq_len=min(context, max_seq_len), compile=None if args.compile == "on" else False)


@torch.no_grad()
def engine_generate(engine, tokenizer, input_ids: torch.Tensor, args: argparse.Namespace,
                    stops: Sequence[str] = ()) -> tuple[str, dict]:
    """Like stream_generate, with the decode engine."""
    from rsparse.runtime.engine import Sampling

    streamer = _streamer(tokenizer)
    streamer.put(input_ids[0])
    new: list[int] = []

    def on_tokens(step):
        if step[0] is None:  # finished (end-of-sequence) rows yield None
            return True
        new.append(step[0])
        streamer.put(torch.tensor([step[0]]))
        return _has_stop(tokenizer, new, stops)

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    result = engine.generate([input_ids[0].tolist()], args.max_new_tokens, sampling,
                             eos_token_id=eos_ids(engine.model, tokenizer), on_tokens=on_tokens)
    streamer.end()
    tokens = result.tokens[0]
    stats = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": len(tokens),
             "seconds": time.perf_counter() - t0 - result.warmup_seconds, "prefill_seconds": result.prefill_seconds,
             "tokens_per_s": len(tokens) / max(result.prefill_seconds + result.decode_seconds, 1e-9),
             "decode_tokens_per_s": result.decode_tokens_per_s, "warmup_seconds": result.warmup_seconds}
    return cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops), stats


def _print_stats(stats: dict) -> None:
    decode = stats["decode_tokens_per_s"]
    warm = stats.get("warmup_seconds") or 0
    print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s; "
          f"prefill {stats['prompt_tokens']} tokens {1e3 * stats['prefill_seconds']:.1f} ms"
          + (f", decode {decode:.1f} tokens/s" if decode is not None else "")
          + (f"; engine warm-up {warm:.1f} s" if warm >= 0.05 else "") + "]", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    _validate(args)
    model, tokenizer = prepare_model(args)
    template = uses_chat_template(tokenizer, args)
    messages = ([{"role": "system", "content": args.system}] if args.system and template else []) + \
        [{"role": "user", "content": args.prompt}]
    ids = encode(tokenizer, messages, template)
    _check_context(model, ids, args.max_new_tokens)
    torch.manual_seed(args.seed)
    if args.engine == "rsparse":
        # cache sized to the request (attention reads every slot), in steps of 256 to reuse compiled code
        engine = make_engine(model, tokenizer, args, -(-(ids.shape[1] + args.max_new_tokens) // 256) * 256)
        _, stats = engine_generate(engine, tokenizer, ids, args, args.stop or ())
    else:
        _, stats = stream_generate(model, tokenizer, ids, args, args.stop or ())
    _print_stats(stats)
    return 0


def cmd_chat(args: argparse.Namespace, stdin=None) -> int:
    _validate(args)
    stdin = stdin or sys.stdin
    model, tokenizer = prepare_model(args)
    template = uses_chat_template(tokenizer, args)
    start = [{"role": "system", "content": args.system}] if args.system and template else []
    # a plain transcript (no chat template) would go on to write the user's next turn
    stops = list(args.stop or ()) + ([] if template else ["\nUser:"])
    history = list(start)
    limit = getattr(model.config, "max_position_embeddings", None)
    engine = make_engine(model, tokenizer, args, 2048) if args.engine == "rsparse" else None
    if engine is not None:
        limit = engine.max_seq_len
    torch.manual_seed(args.seed)
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
        while limit and ids.shape[1] + args.max_new_tokens > limit and len(history) > len(start) + 1:
            del history[len(start):len(start) + 2]
            ids = encode(tokenizer, history, template)
        if engine is not None:
            reply, stats = engine_generate(engine, tokenizer, ids, args, stops)
        else:
            reply, stats = stream_generate(model, tokenizer, ids, args, stops)
        reply = reply.strip()
        history.append({"role": "assistant", "content": reply})
        _print_stats(stats)
    return 0
