"""`rsparse generate` and `rsparse chat`: flags and their checks; the generation itself is
rsparse.runtime.generate."""

from __future__ import annotations

import argparse

from rsparse.cli import common
from rsparse.errors import BadInputError

# Sparsification flags that only apply when the model is not already a checkpoint; unset, they
# take the defaults of RSparseConfig and DataConfig, as for `rsparse compress`.
_SPARSIFY_DEFAULTS = {"sparsity": common.RSPARSE.sparsity, "ratio": common.RSPARSE.ratio, "recipe": None,
                      "calib_corpus": common.DATA.calibration_corpus,
                      "calib_samples": common.RSPARSE.calibration_samples, "seq_len": common.RSPARSE.seq_len}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    common.add_model(p, "rsparse checkpoint directory, or hub id / model directory / .gguf file (sparsified on the fly)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --temperature > 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply once its text contains TEXT (repeatable; shown in the stream, cut from "
                        "a chat reply kept in the history)")
    p.add_argument("--seed", type=int, default=common.RSPARSE.seed, help="sampling and calibration seed")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the text as is, even if the tokenizer has a chat template")
    p.add_argument("--system", default=None, help="system message (with the chat template)")
    p.add_argument("--tokens", default="decode", choices=["decode", "all"],
                   help="decode (default): prefill dense, generation steps sparse; all: every token sparse")
    p.add_argument("--dtype", default=None, choices=common.DTYPES,
                   help="default: the checkpoint's dtype, float32 otherwise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", default="auto", choices=["auto", "rsparse", "hf"],
                   help="rsparse: the static-cache engine (CUDA graphs); hf: transformers' generate; "
                        "auto (default): rsparse on CUDA, hf elsewhere")
    p.add_argument("--compile", default=None, choices=["on", "off"],
                   help="with the rsparse engine on CUDA, the decode step is captured as a CUDA graph; on: also "
                        "compiled with torch.compile (1.2-1.6x faster decoding of sparse models after a warm-up "
                        "of ~10 s, repaid over about ten thousand tokens); off (default): a warm-up of 1-10 s, "
                        "mostly Triton compiling the kernels on a machine's first run")
    g = p.add_argument_group("on-the-fly sparsification (only for a model that is not a checkpoint)")
    g.add_argument("--dense", action="store_true", help="no sparsification (a checkpoint: restore its dense layers)")
    g.add_argument("--sparsity", type=float, default=None, help=f"target sparsity (default {common.RSPARSE.sparsity})")
    g.add_argument("--ratio", type=float, default=None, help=f"uniform rho (default {common.RSPARSE.ratio})")
    g.add_argument("--recipe", default=None, help="per-layer recipe JSON")
    g.add_argument("--calib-corpus", default=None, help=f"calibration corpus or text file (default {common.DATA.calibration_corpus})")
    g.add_argument("--calib-samples", type=int, default=None, help=f"calibration windows (default {common.RSPARSE.calibration_samples})")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per calibration window (default {common.RSPARSE.seq_len})")


def register(subparsers) -> None:
    """Add `rsparse generate` and `rsparse chat` to the subparsers of the rsparse command."""
    g = subparsers.add_parser("generate", help="generate text with a sparsified model (sparse decoding), streamed")
    g.add_argument("--prompt", required=True, help="the prompt (a user message when the chat template is used)")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    c = subparsers.add_parser("chat", help="interactive chat with a sparsified model (stdin lines; /reset, /exit)")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)


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
    if any(not text for text in args.stop or ()):
        raise BadInputError("--stop is empty: give the text that ends generation")
    for flag in ("prompt", "system"):
        try:  # bytes that are not UTF-8 reach argv as lone surrogates, which the tokenizer rejects
            (getattr(args, flag, None) or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadInputError(f"--{flag} is not valid UTF-8 (a bad byte at character {e.start}): "
                                "pass UTF-8 text") from None
    common.check_device(args.device)


def _load(args: argparse.Namespace):
    """(model, tokenizer): a checkpoint as saved, or a model sparsified on the fly unless --dense."""
    from rsparse.core.config import RSparseConfig
    from rsparse.io.checkpoint import is_checkpoint
    from rsparse.runtime import generate

    checkpoint = is_checkpoint(args.model)
    given = [k for k in _SPARSIFY_DEFAULTS if getattr(args, k, None) is not None]
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if given and checkpoint:
        raise BadInputError(f"{args.model} is an rsparse checkpoint, already sparsified; {flags} only apply to "
                            "models that are not (use --dense to run it dense)")
    if given and args.dense:
        raise BadInputError(f"--dense and {flags} exclude each other")
    opts = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in _SPARSIFY_DEFAULTS.items()}
    config = None
    if not checkpoint and not args.dense:
        config = RSparseConfig(sparsity=opts["sparsity"], ratio=opts["ratio"], recipe=opts["recipe"],
                               tokens=args.tokens, calibration_samples=opts["calib_samples"],
                               seq_len=opts["seq_len"], seed=args.seed)
    return generate.load_for_generation(args.model, config, dense=args.dense, tokens=args.tokens,
                                        calib_corpus=opts["calib_corpus"], max_new_tokens=args.max_new_tokens,
                                        device=args.device, dtype=args.dtype)


def _options(args: argparse.Namespace) -> dict:
    """What generate and chat take from the flags."""
    from rsparse.runtime.sampling import Sampling

    return {"system": args.system, "chat_template": not args.no_chat_template, "max_new_tokens": args.max_new_tokens,
            "sampling": Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
            "stops": args.stop or (), "engine": args.engine, "compile": args.compile == "on"}


def cmd_generate(args: argparse.Namespace) -> int:
    from rsparse.runtime import generate

    _validate(args)
    model, tokenizer = _load(args)
    _, stats = generate.generate(model, tokenizer, args.prompt, **_options(args))
    generate.print_stats(stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from rsparse.runtime import generate

    _validate(args)
    model, tokenizer = _load(args)
    generate.chat(model, tokenizer, **_options(args))
    return 0
