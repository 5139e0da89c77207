"""`rsparse generate` and `rsparse chat`: flags; the generation itself is rsparse.generate."""

from __future__ import annotations

import argparse

from rsparse.cli import common
from rsparse.generate import cmd_chat, cmd_generate


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
