"""The bad inputs of issue 15, each against the verbs that take it, on the tiny model (CPU, seconds).

Every case must end as an expected failure: exit status 2, exactly one `error:` line (matching
the case's message), no traceback, no file of the user's changed (every file of the workspace
is hashed before and after) and no temporary folder left behind.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TEXT, tiny_model, tiny_tokenizer
from rsparse.cli import main

pytestmark = pytest.mark.cli

TINY_RUN = ["--seq-len", "32", "--calib-samples", "2", "--ppl-windows", "2"]


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's workspace: models good and bad, corpora good and bad, earlier results."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_tokenizer()
    _save(tiny_model(), tok, root / "tiny")
    _save(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, bos_token_id=1,
                                     eos_token_id=2)), tok, root / "gpt2")
    _save(BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               vocab_size=300)), tok, root / "bert")
    pickle = _save(tiny_model(), tok, root / "pickle")  # weights only as a pickle (pytorch_model.bin)
    from safetensors.torch import load_file

    torch.save(load_file(pickle / "model.safetensors"), pickle / "pytorch_model.bin")
    (pickle / "model.safetensors").unlink()
    shutil.copytree(root / "tiny", root / "badtok")
    (root / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "garb')
    (root / "notamodel").mkdir()
    (root / "notamodel" / "notes.txt").write_text("hello")

    (root / "good.txt").write_text(TEXT)
    (root / "binary.txt").write_bytes(b"\x7fELF\x00\x01" * 200)
    (root / "random.txt").write_bytes(bytes(range(128, 256)) * 8)
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Too short.")
    (root / "afile").write_text("a file, not a directory")

    # an rsparse model directory, and copies with an edited config.json / tokenizer file
    assert main(["compress", "--model", str(root / "tiny"), "--out", str(root / "ck"), "--calib-corpus",
                 str(root / "good.txt"), "--calib-samples", "2", "--seq-len", "32"]) == 0
    for name, edit in (("ck_rope", ("config.json", '"rope_theta": ', '"rope_theta": 1.5e3, "x": ')),
                       ("ck_tok", ("tokenizer.json", '"version"', '"version" ')),
                       ("ck_layers", ("config.json", '"method": "rsparse"', '"method": "dense"'))):
        shutil.copytree(root / "ck", root / name)
        file, old, new = edit
        text = (root / name / file).read_text()
        assert old in text
        (root / name / file).write_text(text.replace(old, new, 1))

    # earlier results the user wants to keep
    for verb in ("run", "eval"):
        (root / f"{verb}_out").mkdir()
        (root / f"{verb}_out" / "results.json").write_text('{"rows": [{"method": "dense", "ppl": 12.3}]}')
        (root / f"{verb}_out" / "results.md").write_text("| dense | 12.3 |\n")
    (root / "search_out").mkdir()
    (root / "search_out" / "search_state.json").write_text('{"settings": {"sparsity": 0.5}, "gro')
    (root / "search_other").mkdir()
    (root / "search_other" / "search_state.json").write_text(json.dumps({"settings": {}, "identity": {}}))
    names = json.loads((root / "ck" / "config.json").read_text())["quantization_config"]["layers"]
    (root / "recipe_bad_name.json").write_text(json.dumps({"layers": [{"name": n.replace("layers", "blocks"), "rho": 0.5}
                                                                      for n in names]}))
    for name, layers in _bad_recipes().items():
        (root / f"recipe_{name}.json").write_text(json.dumps({"sparsity": 0.5, "layers": layers}))
    return root


def _bad_recipes() -> dict:
    """Recipes for the tiny model (14 projections), each wrong in one way."""
    from rsparse.core.models import decoder_linears

    good = [{"name": l.name, "shape": [l.module.out_features, l.module.in_features], "rho": 0.9}
            for l in decoder_linears(tiny_model())]
    one = lambda **change: [dict(good[0], **change)] + good[1:]  # noqa: E731 (the first layer changed)
    return {"shape": one(shape=[64, 32]), "shape_text": one(shape="64x64"), "duplicate": good[:-1] + good[:1],
            "missing": good[:-1], "extra": good + [dict(good[0], name="model.layers.9.mlp.up_proj")],
            "rho_range": one(rho=1.5), "rho_text": one(rho="high"), "rho_null": one(rho=None),
            "sparsity_range": one(sparsity=1.2), "no_name": [{"rho": 0.9}] + good[1:]}


def _cases():
    m = ["--model", "{ws}/tiny"]
    g = ["generate", *m, "--dense", "--no-chat-template", "--max-new-tokens", "4"]
    run = ["run", *m, "--calib-corpus", "{ws}/good.txt", "--ppl-corpus", "{ws}/good.txt", *TINY_RUN]
    comp = ["compress", *m, "--calib-corpus", "{ws}/good.txt", "--seq-len", "32", "--calib-samples", "2"]
    ev = ["eval", *m, "--methods", "dense", "--tasks", "piqa", "--limit", "2", "--ppl-windows", "0",
          "--xsum-samples", "0", "--seq-len", "32"]
    srch = ["search", *m, "--calib-corpus", "{ws}/good.txt", "--ppl-corpus", "{ws}/good.txt", "--seq-len", "32",
            "--calib-samples", "2", "--ppl-windows", "0", "--population", "4", "--generations", "1"]
    ana = ["analyze", *m, "--corpus", "{ws}/good.txt", "--ppl-corpus", "{ws}/good.txt", "--seq-len", "32"]
    cases = {
        # the model
        "model-nonexistent": (["run", "--model", "/nonexistent/model"], "no such model: /nonexistent/model"),
        "model-relative-nonexistent": (["run", "--model", "no/such/model/dir"], "no such model"),
        "model-not-a-model-dir": (["run", "--model", "{ws}/notamodel"], "not a model directory: no config.json in"),
        "model-gpt2": (["run", "--model", "{ws}/gpt2"], "GPT2.*no q/k/v/o projections"),
        "model-bert": (["compress", "--model", "{ws}/bert", "--out", "{ws}/new_ck"], "Bert.*(no q/k/v/o|not a causal)"),
        "model-hub-offline": (["run", "--model", "nobody-xyz/not-cached-model"], "offline"),
        "model-pickle": (["run", "--model", "{ws}/pickle"], "only pickle weights.*safetensors only"),
        "model-garbage-tokenizer": (["run", "--model", "{ws}/badtok", "--seq-len", "32"], "cannot read the tokenizer in"),
        "generate-gpt2": (["generate", "--model", "{ws}/gpt2", "--prompt", "hi", "--dense"], "no q/k/v/o"),
        # corpora
        "corpus-binary": ([*run, "--calib-corpus", "{ws}/binary.txt"], "is binary"),
        "corpus-random-bytes": ([*comp, "--calib-corpus", "{ws}/random.txt", "--out", "{ws}/new_ck"], "not UTF-8"),
        "corpus-empty": ([*run, "--ppl-corpus", "{ws}/empty.txt"], "is empty"),
        "corpus-too-short": ([*run, "--calib-corpus", "{ws}/short.txt"], "too short"),
        "corpus-unknown-name": ([*run, "--calib-corpus", "wikitext3"], "unknown corpus 'wikitext3'"),
        "corpus-a-directory": (["analyze", *m, "--corpus", "{ws}/notamodel"], "is a directory"),
        # limits
        "seq-len-beyond-context": ([*run, "--seq-len", "100000"], "longer than the model's context of 256"),
        "compress-rounding-without-int4": ([*comp, "--rounding", "hqq", "--out", "{ws}/new_ck"],
                                           "--rounding hqq rounds 4-bit weights: add --weights int4"),
        "eval-seq-len-beyond-context": ([*ev, "--seq-len", "4096", "--out", "{ws}/new_eval"], "context of 256"),
        "prompt-empty": ([*g, "--prompt", ""], "--prompt is empty"),
        "prompt-blank": ([*g, "--prompt", "  \n "], "--prompt is empty"),
        "prompt-invalid-utf8": ([*g, "--prompt", b"caf\xe9 \xff".decode("utf-8", "surrogateescape")], "not valid UTF-8"),
        "prompt-beyond-context": ([*g, "--prompt", "fox " * 400], "exceeds the model's context of 256"),
        # the device
        "device-cuda": ([*run, "--device", "cuda"], "CUDA is not available"),
        "device-cuda-generate": ([*g, "--prompt", "hi", "--device", "cuda"], "CUDA is not available"),
        "device-unknown": ([*run, "--device", "tpu"], "unknown device"),
        # checkpoints that were edited
        "checkpoint-config-edited": (["generate", "--model", "{ws}/ck_rope", "--prompt", "hi"],
                                     "config.json does not match its recorded sha256"),
        "checkpoint-tokenizer-edited": (["generate", "--model", "{ws}/ck_tok", "--prompt", "hi"],
                                        "tokenizer.json does not match its recorded sha256"),
        "checkpoint-layers-edited": (["generate", "--model", "{ws}/ck_layers", "--prompt", "hi"],
                                     "(layer layout|does not match)"),
        # recipes
        "recipe-wrong-names": ([*run, "--recipe", "{ws}/recipe_bad_name.json", "--methods", "rsparse"], "recipe"),
        "recipe-missing-file": ([*comp, "--recipe", "{ws}/nope.json", "--out", "{ws}/new_ck"], "recipe file not found"),
        # search state
        "search-state-truncated": ([*srch, "--out", "{ws}/search_out"], "search state .* is damaged"),
        "search-state-other-settings": ([*srch, "--out", "{ws}/search_other"], "^(?!.*--checkpoint).*other settings"),
        # never overwrite
        "run-out-has-results": ([*run, "--out", "{ws}/run_out"], "already holds results.*--overwrite"),
        "eval-out-has-results": ([*ev, "--out", "{ws}/eval_out"], "already holds results.*--overwrite .*or --resume"),
        "compress-out-is-a-model": ([*comp, "--out", "{ws}/ck"], "already exists.*--overwrite"),
    }
    # an --out that is a file or cannot be written: refused at once, by every verb that writes
    for verb, argv in (("run", run), ("eval", ev), ("compress", comp), ("search", srch), ("analyze", ana)):
        cases[f"{verb}-out-is-a-file"] = ([*argv, "--out", "{ws}/afile"], "is a file")
        cases[f"{verb}-out-unwritable"] = ([*argv, "--out", "/proc/rsparse-out"], "not writable")
    return cases


CASES = _cases()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, ws, capsys, monkeypatch):
    if case.startswith("device-cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _one_error_line(*CASES[case], ws, capsys, monkeypatch)


def _preload_cases():
    """A recipe that does not fit the model and a length beyond its context, against every verb
    that takes them: refused from the model's config, before its weights load."""
    m = ["--model", "{ws}/tiny"]
    good, gen = "{ws}/good.txt", ["--prompt", "hi", "--no-chat-template", "--max-new-tokens", "4"]
    verbs = {  # each verb with a recipe, and every other flag fine
        "run": ["run", *m, "--calib-corpus", good, "--ppl-corpus", good, *TINY_RUN, "--methods", "rsparse"],
        "compress": ["compress", *m, "--calib-corpus", good, "--seq-len", "32", "--out", "{ws}/new_ck"],
        "eval": ["eval", *m, "--methods", "dense,rsparse", "--tasks", "piqa", "--ppl-windows", "0",
                 "--xsum-samples", "0", "--seq-len", "32", "--out", "{ws}/new_eval"],
        "generate": ["generate", *m, *gen, "--calib-corpus", good, "--seq-len", "32"],
    }
    recipe_errors = {"bad_name": "recipe layer names not in the model: .*model.blocks.0",
                     "shape": r"recipe gives model.layers.0.self_attn.q_proj shape \[64, 32\], the model has \[64, 64\]",
                     "shape_text": "recipe gives .* shape '64x64'", "duplicate": "names layer .*q_proj' twice",
                     "missing": "recipe has 13 layers but the model has 14",
                     "extra": "recipe has 15 layers but the model has 14",
                     "rho_range": r"recipe rho of .*q_proj must be in \[0, 1\], got 1.5",
                     "rho_text": r"recipe rho of .*q_proj must be in \[0, 1\], got 'high'",
                     "rho_null": "recipe rho of .*q_proj must be in .*got None",
                     "sparsity_range": r"recipe sparsity of .*q_proj must be in \[0, 1\), got 1.2",
                     "no_name": "recipe layer 0 must be an object with a 'name'"}
    cases = {f"{verb}-recipe-{kind}": ([*argv, "--recipe", f"{{ws}}/recipe_{kind}.json"], match)
             for verb, argv in verbs.items() for kind, match in recipe_errors.items()}
    context = "longer than the model's context of 256 tokens"
    srch = ["search", *m, "--calib-corpus", good, "--ppl-corpus", good, "--seq-len", "32", "--out", "{ws}/new_search"]
    cases.update({
        "run-seq-len": ([*verbs["run"], "--seq-len", "257"], "--seq-len 257 is " + context),
        "run-seq-len-embedded-gguf": (["run", "--seq-len", "100000"], "context of 8192 tokens"),
        "compress-seq-len": ([*verbs["compress"], "--seq-len", "300"], context),
        "eval-seq-len": ([*verbs["eval"], "--seq-len", "4096"], context),
        "search-seq-len": ([*srch, "--seq-len", "300"], context),
        "search-ppl-seq-len": ([*srch, "--ppl-windows", "2", "--ppl-seq-len", "300"], "--ppl-seq-len 300 is " + context),
        "compare-recipes-seq-len": (["compare-recipes", *m, "--calib-corpus", good, "--ppl-corpus", good, "--tasks",
                                     "none", "--seq-len", "300", "--out", "{ws}/new_cmp"], context),
        "analyze-seq-len": (["analyze", *m, "--corpus", good, "--ppl-corpus", good, "--seq-len", "300", "--out",
                             "{ws}/new_analyze"], context),
        "generate-seq-len": ([*verbs["generate"], "--seq-len", "300"], context),
        "generate-max-new-tokens": (["generate", *m, *gen, "--dense", "--max-new-tokens", "256"],
                                    "--max-new-tokens 256 leaves no room for a prompt in the model's context of 256"),
        "generate-checkpoint-max-new-tokens": (["generate", "--model", "{ws}/ck", *gen, "--max-new-tokens", "300"],
                                               "context of 256"),
        "compress-checkpoint-recipe": (["compress", "--model", "{ws}/ck", "--calib-corpus", good, "--seq-len", "32",
                                        "--recipe", "{ws}/recipe_missing.json", "--out", "{ws}/new_ck"],
                                       "is an rsparse checkpoint, already sparsified: a --recipe does not apply"),
    })
    return cases


PRELOAD_CASES = _preload_cases()


@pytest.fixture()
def no_model_load(monkeypatch):
    """Every way rsparse loads weights fails the test: the case had to be refused before."""
    import transformers

    import rsparse.core.models
    import rsparse.io.checkpoint

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    for module, name in ((rsparse.core.models, "load_model"),
                         (rsparse.io.checkpoint, "load_any"), (transformers.AutoModelForCausalLM, "from_pretrained")):
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("case", list(PRELOAD_CASES))
def test_refused_before_the_model_loads(case, ws, capsys, monkeypatch, no_model_load):
    _one_error_line(*PRELOAD_CASES[case], ws, capsys, monkeypatch)


def _one_error_line(argv, match, ws, capsys, monkeypatch):
    """Exit status 2, one `error:` line matching `match`, no traceback, no file changed or left."""
    import re

    argv = [a.replace("{ws}", str(ws)) for a in argv]
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in (captured.err + captured.out).splitlines() if line.startswith("error:")]
    assert code == 2, f"exit status {code}: {captured.err[-2000:]}"
    assert len(errors) == 1, errors
    assert re.search(match, errors[0]), f"{match!r} not in {errors[0]!r}"
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(ws) == before, "a file of the user's changed"
    left = [p for p in ws.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, f"temporary files left: {left}"
    assert not [p for p in ws.iterdir() if p.name.startswith("new_")], "an --out was created"
    assert not os.path.exists("/proc/rsparse-out")
