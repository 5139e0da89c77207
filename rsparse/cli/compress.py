"""`rsparse compress`: sparsify a model (calibrated; decode tokens sparse) and save it as a
transformers directory (quant_method "rsparse": `AutoModelForCausalLM.from_pretrained` after
`import rsparse`), with a model card."""

from __future__ import annotations

import argparse
import sys
import time

from rsparse.cli import common
from rsparse.core.config import INT4_GROUP_SIZES, INT4_ROUNDINGS, LAYER_METHODS, RSparseConfig, load_recipe
from rsparse.errors import BadInputError


def register(subparsers) -> None:
    p = subparsers.add_parser("compress", help="sparsify a model (calibrated, decode tokens sparse) and save a checkpoint")
    common.add_model(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    common.add_sparsify(p)
    p.add_argument("--method", default=common.RSPARSE.method, choices=list(LAYER_METHODS),
                   help="sparse = rho 1, lowrank = rho 0")
    p.add_argument("--weights", default="fp", choices=["fp", "int4"],
                   help="fp: the model's float weights; int4: 4-bit weights (asymmetric, groups of --group-size input "
                        "channels, rounded by --rounding) for the 4-bit kernels, calibrated on the rounded weights")
    p.add_argument("--group-size", type=int, default=common.RSPARSE.group_size, choices=list(INT4_GROUP_SIZES),
                   help="input channels per 4-bit scale/zero (--weights int4; a layer it does not divide gets the "
                        "largest smaller size that does)")
    p.add_argument("--rounding", default=common.RSPARSE.rounding, choices=list(INT4_ROUNDINGS),
                   help="how --weights int4 picks each group's scale and zero: rtn (integer zero point) or hqq "
                        "(HQQ's optimised zero, 4-5%% lower perplexity on the embedded model; needs rsparse[quant])")
    common.add_calibration(p)
    common.add_device(p)
    p.add_argument("--save-dtype", default=None, choices=common.DTYPES,
                   help="dtype of the saved weights (default: the model's own: its config's dtype; bfloat16 for a "
                        ".gguf file); --dtype is the dtype calibration computes in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory (a model included)")
    p.add_argument("--ppl-corpus", default="boolq", help="corpus of the model card's perplexity (boolq: offline)")
    p.add_argument("--ppl-windows", type=int, default=0, help="perplexity windows for the model card (0: not measured)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (save_pretrained's max_shard_size)")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from rsparse.core.data import load_windows
    from rsparse.core.models import DEFAULT_MODEL_NAME, load_model, source_dtype
    from rsparse.eval.perplexity import model_card_perplexity
    from rsparse.io.checkpoint import check_target, save_pretrained
    from rsparse.io.outdir import check_writable, remove_stale_temps
    from rsparse.methods import sparsify_

    # everything cheap first, the target directory included
    config = RSparseConfig(sparsity=args.sparsity, ratio=args.ratio, recipe=args.recipe, method=args.method,
                           tokens="decode", calibration_samples=args.calib_samples, seq_len=args.seq_len,
                           seed=args.seed, weight_bits=4 if args.weights == "int4" else 16,
                           group_size=args.group_size, rounding=args.rounding)
    if args.recipe:
        load_recipe(args.recipe)
    common.require(args.seq_len >= 2, "--seq-len must be >= 2")
    common.require(args.weights == "int4" or args.rounding == common.RSPARSE.rounding,
                   f"--rounding {args.rounding} rounds 4-bit weights: add --weights int4")
    if args.weights == "int4" and args.rounding == "hqq":
        common.require_hqq("--rounding hqq")
    common.require(args.ppl_windows >= 0, "--ppl-windows must be >= 0")
    common.check_corpora(args.calib_corpus, *([args.ppl_corpus] if args.ppl_windows else []))
    common.check_device(args.device)
    target = check_writable(args.out)
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        raise BadInputError(f"--out {target} already exists and is not empty (a model directory or other files): "
                            "pass --overwrite to replace it, or choose another directory")
    check_target(target, args.overwrite)
    remove_stale_temps(target)
    common.check_model(args.model, args.seq_len, config)  # the recipe and --seq-len, before the weights load

    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    name = args.model or DEFAULT_MODEL_NAME
    save_dtype = getattr(torch, args.save_dtype) if args.save_dtype else source_dtype(model)
    calib = load_windows(tokenizer, args.calib_corpus, args.seq_len, args.calib_samples, "calibration", args.seed)
    print(f"model: {name}; calibrating on {calib.shape[0]} x {calib.shape[1]} tokens of {args.calib_corpus}",
          file=sys.stderr)
    report = sparsify_(model, config, calib)
    ppl = model_card_perplexity(model, tokenizer, args.ppl_corpus, args.seq_len, args.ppl_windows)
    model.to(save_dtype)  # float32 storage of a bfloat16 model doubled the files for nothing
    out = save_pretrained(model, tokenizer, args.out, report=report, config=config, perplexity=ppl, source=name,
                          overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    dense = sum(r["shape"][0] * r["shape"][1] for r in report)
    read = sum(r["read_fraction"] * r["shape"][0] * r["shape"][1] for r in report) / dense
    methods = sorted({r["method"] for r in report})
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    weights = (f"4-bit weights (groups of {'/'.join(str(g) for g in sorted({r['group_size'] for r in report}))}), "
               if config.weight_bits == 4 else "")
    print(f"saved {out}: {len(report)} layers ({', '.join(methods)}), {weights}target sparsity {100 * args.sparsity:.0f}%, "
          f"reads {100 * read:.1f}% of the decoder projection weights per decode step; "
          f"{size / 1e6:.1f} MB ({str(save_dtype).removeprefix('torch.')}) in {time.time() - start:.0f} s, "
          f"peak memory {common.peak_memory_mb():.0f} MB")
    return 0
