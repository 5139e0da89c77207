"""lm-evaluation-harness on a compressed directory, with the harness's own command line and API.

    rsparse-lm-eval run --model rsparse --model_args pretrained=out/smollm-50 --tasks piqa --limit 100
    python -m rsparse.eval.lm_eval_plugin ...                     # the same command
    python -m rsparse.eval.tasks /tmp/tasks                       # offline task YAMLs, then:
    rsparse-lm-eval run --model rsparse --model_args pretrained=DIR --include_path /tmp/tasks --tasks piqa

The command is lm-eval's CLI, unchanged, run after this module has registered the model name
`rsparse` (and `import rsparse` the directory format with transformers). From Python:

    import rsparse.eval.lm_eval_plugin                            # registers model "rsparse"
    lm_eval.simple_evaluate(model="rsparse", model_args="pretrained=DIR", tasks=[...])

Why a model of its own and not lm-eval's `hf`: an R-Sparse directory is saved with decode tokens
sparse and the prompt dense, and lm-eval scores every choice in one forward pass, which is all
prompt: `hf` would score the dense model. The `rsparse` model scores as `rsparse eval` does (the
paper's protocol: the second half of each scored sequence sparse, `tokens=second_half`; or
`tokens=all`), with each padded row's real length declared to the layers, so its numbers equal
`rsparse.evaluate_tasks` on the same directory, tasks and limit. `--model hf` on an rsparse
directory is refused by this command with that reason.
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model

from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import BadInputError, RsparseError
from rsparse.eval.harness import _row_length_hflm, declared_row_lengths
from rsparse.eval.perplexity import SCORED_MODES
from rsparse.io.checkpoint import is_checkpoint, load


@register_model("rsparse")
class RSparseLM(_row_length_hflm()):
    """lm-eval's HFLM over an rsparse directory (or an in-memory sparsified model), scoring with
    `tokens` sparse (default second_half, as `rsparse eval`)."""

    def __init__(self, pretrained, tokens: str = "second_half", dtype=None, device: str | None = None, tokenizer=None,
                 **kwargs):
        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # what lm-eval's hf model falls back to
        if tokens not in SCORED_MODES:
            raise BadInputError(f"tokens={tokens!r}: the rsparse model scores with one of {', '.join(SCORED_MODES)}")
        if isinstance(pretrained, str):
            if not is_checkpoint(pretrained):
                raise BadInputError(f"pretrained={pretrained}: not an rsparse model directory (rsparse compress "
                                    "writes one); for a dense model use lm-eval's --model hf")
            pretrained, saved_tokenizer = load(pretrained, device=device, dtype=None if dtype in (None, "auto") else dtype)
            tokenizer = tokenizer or saved_tokenizer
        set_token_mode(pretrained, tokens)
        self.tokens = tokens
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=device, **kwargs)

    def _loglikelihood_tokens(self, *args, **kwargs):
        with declared_row_lengths():  # lm-eval right-pads rows: each one's own second half is sparse
            return super()._loglikelihood_tokens(*args, **kwargs)


def _option(argv: list[str], *names: str) -> list[str]:
    """The values given to an option of lm-eval's command line (`--opt v1 v2`, `--opt=v`)."""
    values = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in names and eq:
            values.append(value)
        elif arg in names:
            values += [v for v in _until_next_option(argv[i + 1:])]
    return values


def _until_next_option(rest: list[str]) -> list[str]:
    out = []
    for arg in rest:
        if arg.startswith("-"):
            break
        out.append(arg)
    return out


def _refuse_hf_on_rsparse(argv: list[str]) -> None:
    """`--model hf` (lm-eval's default) with pretrained= an rsparse directory would score it dense."""
    model = (_option(argv, "--model", "-M") or ["hf"])[0]
    pairs = [kv.partition("=") for value in _option(argv, "--model_args", "-a") for kv in value.split(",")]
    if model == "hf" and any(k.strip() == "pretrained" and is_checkpoint(v.strip()) for k, _, v in pairs):
        raise BadInputError("--model hf scores an rsparse directory as a dense model (lm-eval scores the whole "
                            "sequence in one prefill pass, which R-Sparse keeps dense): use --model rsparse")


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the model `rsparse` registered."""
    import lm_eval.evaluator
    from lm_eval.__main__ import cli_evaluate

    from rsparse.eval.harness import _quiet_git_hash

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash  # no "fatal: not a git repository" outside a checkout
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_hf_on_rsparse(argv)
    except RsparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except RsparseError as e:  # a bad directory or tokens=: one line, as the rsparse command prints it
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
