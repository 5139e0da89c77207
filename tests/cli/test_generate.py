"""rsparse generate / chat (CLI, built as rsparse.cli builds it) on tiny models, and one real answer."""

import io

import pytest
import torch

from conftest import cli_error, tiny_model, tiny_tokenizer
from rsparse.core.layer import rsparse_layers
from rsparse.io import checkpoint
from rsparse.io.checkpoint import load_any as load  # compress writes a transformers directory
from rsparse.runtime import generate

pytestmark = pytest.mark.cli

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def readable_tokenizer():
    """The tiny tokenizer with a byte-level decoder, so decode() gives the text back."""
    from tokenizers import decoders

    tok = tiny_tokenizer()
    tok.backend_tokenizer.decoder = decoders.ByteLevel()
    return tok


def run_cli(argv):
    """The real `rsparse` entry point, in process."""
    from rsparse.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compressed(hf_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny-rsparse"
    run_cli(["compress", "--model", str(hf_dir), "--out", str(out), "--calib-corpus", str(text_file),
             "--calib-samples", "2", "--seq-len", "32"])
    return out


def test_generate_from_a_checkpoint_streams_the_greedy_text(compressed, capsys):
    capsys.readouterr()
    prompt = "The quick brown fox"
    assert run_cli(["generate", "--model", str(compressed), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "rsparse checkpoint, 14 R-Sparse layers" in err and "tokens/s" in err
    model, tok = load(compressed)
    assert {l.tokens for l in rsparse_layers(model)} == {"decode"}  # prefill dense, decode steps sparse
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **generate.generation_kwargs(model, tok, 8))
    new = ref[0, ids.shape[1]:]
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"
    assert f"[{new.numel()} tokens in" in err


def test_generate_sparsifies_on_the_fly_or_dense(hf_dir, text_file, capsys):
    base = ["generate", "--model", str(hf_dir), "--prompt", "A stitch in time", "--max-new-tokens", "4"]
    run_cli(base + ["--calib-corpus", str(text_file), "--calib-samples", "2", "--seq-len", "32",
                    "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3"])
    assert "sparsifying on the fly at 50%" in capsys.readouterr().err
    run_cli(base + ["--dense"])
    assert "(dense)" in capsys.readouterr().err


def test_checkpoint_rejects_sparsification_flags(compressed, capsys):
    cli_error(capsys, ["generate", "--model", str(compressed), "--prompt", "x", "--sparsity", "0.3"], "already sparsified")
    cli_error(capsys, ["generate", "--model", "whatever", "--prompt", "x", "--dense", "--ratio", "0.5"], "exclude")
    run_cli(["generate", "--model", str(compressed), "--prompt", "x", "--dense", "--max-new-tokens", "2"])
    assert "dense; loaded" in capsys.readouterr().err  # --dense restores a checkpoint's dense layers


def test_chat_keeps_history_with_the_template_and_resets(compressed, tmp_path, monkeypatch, capsys):
    model, _ = load(compressed)
    tok = readable_tokenizer()
    tok.chat_template = TEMPLATE
    path = checkpoint.save_pretrained(model, tok, tmp_path / "chat")
    prompts = []
    original = generate.stream_generate

    def recording(model, tokenizer, input_ids, *args):
        prompts.append(tokenizer.decode(input_ids[0]))
        return original(model, tokenizer, input_ids, *args)

    monkeypatch.setattr(generate, "stream_generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nthe quick fox\n/reset\nrivers\n/exit\nnever read\n"))
    assert run_cli(["chat", "--model", str(path), "--max-new-tokens", "3", "--system", "be brief"]) == 0
    assert len(prompts) == 3
    assert prompts[0].startswith("<s>system: be brief\n<s>user: hello there\n") and prompts[0].endswith("assistant:")
    assert "user: hello there" in prompts[1] and "<s>assistant: " in prompts[1] and "user: the quick fox" in prompts[1]
    assert "hello" not in prompts[2] and prompts[2].startswith("<s>system: be brief\n<s>user: rivers")
    err = capsys.readouterr().err
    assert err.count(" tokens in ") == 3 and "(history cleared)" in err


def test_chat_without_template_ends_at_end_of_input(compressed, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("The quick\nbrown fox\n"))
    assert run_cli(["chat", "--model", str(compressed), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().err.count(" tokens in ") == 2
    tok = readable_tokenizer()
    ids = generate.encode(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                {"role": "user", "content": "c"}], chat_template=False)
    assert tok.decode(ids[0], skip_special_tokens=True) == "User: a\nAssistant: b\nUser: c\nAssistant:"


@pytest.mark.real_model
def test_embedded_model_answers(capsys):
    """The real embedded SmolLM2-135M-Instruct, dense, raw prompt (bounded: ~20 s to load)."""
    run_cli(["generate", "--prompt", "The capital of France is", "--dense", "--no-chat-template",
             "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert "Paris" in out and "tokens/s" in err


def test_engine_and_transformers_generate_the_same_text(compressed, monkeypatch, capsys):
    """`--engine rsparse` (the decode engine; eager on CPU) and `--engine hf` stream the same greedy
    text from a checkpoint, and print prefill and decode timings."""
    from transformers import TextStreamer

    monkeypatch.setattr(TextStreamer, "on_finalized_text", lambda self, text, stream_end=False: print(text, end=""))
    capsys.readouterr()
    base = ["generate", "--model", str(compressed), "--prompt", "Rivers flow to the", "--max-new-tokens", "12"]
    run_cli(base + ["--engine", "hf"])
    hf_out, _ = capsys.readouterr()
    run_cli(base + ["--engine", "rsparse"])
    engine_out, err = capsys.readouterr()
    assert engine_out == hf_out and len(hf_out.split()) >= 2
    assert "prefill" in err and "decode" in err and "tokens/s" in err


def test_chat_through_the_engine_keeps_history(compressed, monkeypatch, capsys):
    seen = []
    original = generate.engine_generate

    def recording(engine, tokenizer, input_ids, max_new_tokens, sampling, stops=()):
        seen.append((input_ids.shape[1], engine.max_seq_len, stops))
        return original(engine, tokenizer, input_ids, max_new_tokens, sampling, stops)

    monkeypatch.setattr(generate, "engine_generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("The quick\nbrown fox\n"))
    assert run_cli(["chat", "--model", str(compressed), "--max-new-tokens", "3", "--engine", "rsparse"]) == 0
    assert len(seen) == 2 and seen[1][0] > seen[0][0]  # the second prompt holds the first exchange
    assert seen[0][2] == ["\nUser:"] and seen[0][1] == 256  # one engine, sized to the tiny model's context


def test_stop_text_ends_generation_in_both_engines(compressed, monkeypatch, capsys):
    """--stop ends generation at the token whose text completes the stop text, with transformers'
    generate and with the engine alike; the returned text ends before it."""
    from transformers import TextStreamer

    model, tok = load(compressed)
    prompt = "Rivers flow to the"
    ids = tok(prompt, return_tensors="pt").input_ids
    kwargs = generate.generation_kwargs(model, tok, 12) | {"eos_token_id": None}
    new = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()
    texts = [tok.decode(new[: i + 1], skip_special_tokens=True) for i in range(len(new))]
    # the first token that adds text not seen before: generation must end right there
    at = next(i for i in range(3, len(new)) if texts[i] != texts[i - 1] and texts[i][len(texts[i - 1]):].strip()
              and texts[i][len(texts[i - 1]):].strip() not in texts[i - 1])
    stop = texts[at][len(texts[at - 1]):].strip()
    monkeypatch.setattr(TextStreamer, "on_finalized_text", lambda self, text, stream_end=False: print(text, end=""))
    monkeypatch.setattr(generate, "eos_ids", lambda model, tokenizer: [])  # a random model may end anywhere
    outs = []
    for engine in ("hf", "rsparse"):
        capsys.readouterr()
        base = ["generate", "--model", str(compressed), "--prompt", prompt, "--max-new-tokens", "12"]
        assert run_cli(base + ["--stop", stop, "--stop", "never-generated", "--engine", engine]) == 0
        out, err = capsys.readouterr()
        assert f"[{at + 1} tokens in" in err, (engine, err)
        outs.append(out)
    assert outs[0] == outs[1] and stop in outs[0]
    assert generate.cut_at_stop(texts[-1], [stop, "zzz"]) == texts[-1][: texts[-1].index(stop)]
    assert generate.cut_at_stop("no stop here", [stop]) == "no stop here"


def test_empty_stop_text_is_refused(compressed, capsys):
    cli_error(capsys, ["generate", "--model", str(compressed), "--prompt", "x", "--stop", ""], "--stop is empty")


def test_compile_flag_reaches_the_engine_and_only_the_engine(compressed, monkeypatch, capsys):
    """--compile off or unset: the engine's step is only captured (compile=False); on (CUDA only):
    compiled too (compile=None, the engine's CUDA default). With transformers' generate the flag
    is refused, and --compile on off CUDA."""
    from rsparse.runtime import engine as engine_module

    built = []

    class Recording(engine_module.Engine):
        def __init__(self, model, **kwargs):
            built.append(kwargs["compile"])
            super().__init__(model, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", Recording)
    base = ["generate", "--model", str(compressed), "--prompt", "hello", "--max-new-tokens", "2", "--engine", "rsparse"]
    for flags in ([], ["--compile", "off"]):
        assert run_cli(base + flags) == 0
    assert built == [False, False]
    cli_error(capsys, base + ["--compile", "on"], "--compile on needs a CUDA device, not cpu")
    cli_error(capsys, ["generate", "--model", str(compressed), "--prompt", "x", "--compile", "off"],
              "--compile applies to the rsparse engine, not to --engine hf")
    # on a CUDA device (pretended: the model stays on the CPU) the engine is asked to compile
    monkeypatch.setattr("rsparse.core.models.check_device", lambda device: None)
    monkeypatch.setattr(generate, "load_for_generation", lambda *args, **kwargs: load(str(compressed)))
    assert run_cli(base + ["--device", "cuda", "--compile", "on"]) == 0
    assert built == [False, False, None]
