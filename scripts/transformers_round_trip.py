"""Round trip of a sparsified model through the transformers format, on the embedded SmolLM2-135M.

    .venv/bin/python scripts/transformers_round_trip.py [--out out/smollm-hf] [--limit 5] [--windows 2] [--device cpu]

Sparsifies at 50% (uniform rho 0.95, every token sparse), saves with rsparse.save_pretrained,
loads with plain AutoModelForCausalLM.from_pretrained (after `import rsparse`), and compares:
the logits on held-out BoolQ windows (bit for bit), and lm-eval's HFLM(pretrained=model) scores
on offline PIQA and ARC-Easy examples (accuracy and every per-choice log-likelihood). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/smollm-hf")
    p.add_argument("--limit", type=int, default=5, help="examples per lm-eval task")
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", type=int, default=2, help="held-out BoolQ windows of 512 tokens for the logits")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rsparse
    from rsparse.core.layer import rsparse_layers
    from rsparse.eval.hub import datasets_offline
    from rsparse.eval.tasks import write_offline_tasks

    t0 = time.time()
    model, tok = rsparse.load_model(dtype=args.dtype, device=args.device)
    calib = rsparse.load_windows(tok, "coqa", 512, 16, "calibration")
    rsparse.sparsify_(model, rsparse.RSparseConfig(sparsity=0.5, ratio=0.95, tokens="all"), calib)
    out = rsparse.save_pretrained(model, tok, args.out, overwrite=True)
    t_save = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto", device_map=args.device)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    t_load = time.time()

    windows = rsparse.load_windows(tok, "boolq", 512, args.windows, "perplexity").to(args.device)
    with torch.no_grad():
        a, b = model(windows).logits, loaded(windows).logits
    logits = {"windows": list(windows.shape), "bit_identical": bool(torch.equal(a, b)),
              "max_abs_diff": float((a - b).abs().max())}

    scores = {}
    with tempfile.TemporaryDirectory() as d:
        tasks = [str(x) for x in write_offline_tasks(d, args.tasks.split(",")).values()]
        for label, m, t in (("in_memory", model, tok), ("loaded", loaded, loaded_tok)):
            lm = HFLM(pretrained=m, tokenizer=t, batch_size=1, device=args.device)
            with datasets_offline():
                res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=args.limit,
                                              log_samples=True, task_manager=TaskManager(include_defaults=False),
                                              bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                              torch_random_seed=0, fewshot_random_seed=0)
            scores[label] = {task: {"acc": res["results"][task]["acc,none"],
                                    "acc_norm": res["results"][task].get("acc_norm,none"),
                                    "loglikelihoods": [r[0][0] for s in res["samples"][task] for r in s["resps"]]}
                             for task in res["results"]}
    equal = {task: scores["in_memory"][task] == scores["loaded"][task] for task in scores["in_memory"]}
    report = {
        "directory": str(out), "files": sorted(x.name for x in out.iterdir()),
        "layers": len(rsparse_layers(loaded)), "logits": logits,
        "lm_eval": {task: {"acc": scores["in_memory"][task]["acc"], "acc_norm": scores["in_memory"][task]["acc_norm"],
                           "loglikelihoods_compared": len(scores["in_memory"][task]["loglikelihoods"]),
                           "identical": equal[task]} for task in equal},
        "seconds": {"sparsify_and_save": round(t_save - t0, 1), "load": round(t_load - t_save, 2),
                    "total": round(time.time() - t0, 1)},
        "device": args.device, "dtype": args.dtype,
    }
    print(json.dumps(report, indent=2))
    return 0 if logits["bit_identical"] and all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
