"""rsparse.io.checkpoint (the one format: a transformers directory) and rsparse.io.convert (the older
rsparse.json format): round trips with bit-identical logits, no unpickling, generation, tied bf16
and bias models, load_any, refusals, atomic saves, and the conversion of older checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, tiny_model
from legacy_writer import save_legacy
from rsparse import RSparseConfig, sparsify_
from rsparse.core.data import calibration_windows
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import CheckpointError, CheckpointFileMissing
from rsparse.io.checkpoint import is_checkpoint, load, load_any, save_pretrained
from rsparse.io.convert import read_legacy


def sparsify(model, windows, **kw):
    cal = calibration_windows(windows, 64, 4, seed=0)
    config = RSparseConfig(sparsity=0.5, ratio=0.8, seq_len=64, calibration_samples=4, max_rows_per_layer=256, **kw)
    return sparsify_(model, config, cal), config


def same_logits(a, b, x, modes=("decode", "all", "second_half")):
    try:
        for mode in modes:
            set_token_mode(a, mode)
            set_token_mode(b, mode)
            assert torch.equal(a(x).logits, b(x).logits), mode
    finally:
        set_token_mode(a, "decode")
        set_token_mode(b, "decode")


@pytest.fixture(scope="module")
def base(tokenizer, windows, tmp_path_factory):
    """A sparsified tiny model (shared, do not change it), its report and config, a saved directory."""
    model = tiny_model()
    report, config = sparsify(model, windows)
    path = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("base") / "ck", report=report, config=config)
    return model, path, report, config


@pytest.fixture()
def saved(base, tmp_path):
    """The shared sparsified model and a private copy of its directory (tests may damage it)."""
    return base[0], Path(shutil.copytree(base[1], tmp_path / "ck"))


def test_round_trip_is_bit_identical_and_unpickles_nothing(saved, windows, monkeypatch):
    model, path = saved

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint is loaded without torch.load (nothing is unpickled)")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, tok = load(path)
    same_logits(model, loaded, windows[:48][None])
    src = {l.name: l for l in rsparse_layers(model)}
    layers = rsparse_layers(loaded)
    assert len(layers) == 14
    for l in layers:
        s = src[l.name]
        assert (l.method, l.tokens, l.keep_fraction, l.rank) == (s.method, s.tokens, s.keep_fraction, s.rank)
        assert l.weight.stride() == (1, l.out_features) == s.weight.stride()  # column-major
        for b in ("threshold", "score_scale", "lr_down", "lr_up"):
            assert torch.equal(getattr(l, b), getattr(s, b)) and getattr(l, b).dtype == getattr(s, b).dtype
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "rsparse" and config["quantization_config"]["base_model_type"] == "llama"
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not (path / "rsparse.json").exists()


def test_generate_works_after_load(saved, windows):
    model, path = saved
    loaded, tok = load(path)
    prompt = windows[:12][None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    out = loaded.generate(prompt, **kw)
    assert out.shape == (1, 18) and torch.equal(out, model.generate(prompt, **kw))
    assert tok is not None and tok.decode(out[0])


def test_qwen2_with_bias_round_trip(tokenizer, windows, tmp_path):
    model = tiny_model("qwen2")
    report, config = sparsify(model, windows, tokens="all")
    path = save_pretrained(model, tokenizer, tmp_path / "q", report=report, config=config)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["base_model_type"] == "qwen2"
    loaded, _ = load(path)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    same_logits(model, loaded, windows[:40][None], modes=("all",))


def test_load_any_falls_back_to_load_model(model, tokenizer, saved, tmp_path):
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    assert not is_checkpoint(hf) and is_checkpoint(saved[1])
    plain, _ = load_any(hf)
    assert not rsparse_layers(plain)
    sparse, _ = load_any(saved[1])
    assert len(rsparse_layers(sparse)) == 14


def test_missing_directory_and_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointFileMissing, match="not found"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not an rsparse model directory"):
        load(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointFileMissing, match="model.safetensors is missing"):
        load(path)


def test_broken_header_is_refused(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (10 ** 12).to_bytes(8, "little")  # header length beyond the file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load(path)


# -- saving -------------------------------------------------------------------------------------
def test_refuses_non_empty_non_checkpoint_directory(base, tokenizer, tmp_path):
    model = base[0]
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="overwrite"):
        save_pretrained(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me"
    save_pretrained(model, tokenizer, target, overwrite=True)
    assert not (target / "notes.txt").exists() and is_checkpoint(target)
    save_pretrained(model, tokenizer, target)  # an existing rsparse directory is replaced without overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_pretrained(model, tokenizer, tmp_path / "file")


def test_failed_save_keeps_the_previous_directory(saved, tokenizer, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tokenizer, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left
    load(path)


# -- the older format: refused with the command that converts it; converted bit for bit ----------
@pytest.fixture()
def legacy(base, tokenizer, tmp_path):
    model, _, report, config = base
    return save_legacy(model, tokenizer, tmp_path / "legacy", report=report, config=config)


def test_older_format_is_refused_with_the_convert_command(legacy):
    for loader in (load, load_any):
        with pytest.raises(CheckpointError, match=r"older rsparse.json format.*rsparse convert .*legacy NEW_DIR"):
            loader(legacy)
    assert not is_checkpoint(legacy)


def test_convert_gives_the_same_logits(base, legacy, windows, tmp_path, capsys):
    from rsparse.cli import main

    model = base[0]
    assert main(["convert", str(legacy), str(tmp_path / "new")]) == 0
    assert "converted" in capsys.readouterr().out
    converted, tok = load(tmp_path / "new")
    same_logits(model, converted, windows[:40][None])
    qc = json.loads((tmp_path / "new" / "config.json").read_text())["quantization_config"]
    assert qc["rsparse_config"]["sparsity"] == 0.5 and qc["summary"]["calibrated_read_fraction"] > 0
    assert tok is not None


def test_convert_refuses_a_damaged_older_checkpoint(legacy, tmp_path):
    f = legacy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5000:-4990] = bytes(b ^ 0xFF for b in data[-5000:-4990])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        read_legacy(legacy)
    (legacy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointFileMissing, match="tokenizer.json is missing"):
        read_legacy(legacy)
    with pytest.raises(CheckpointFileMissing, match="not an rsparse.json checkpoint"):
        read_legacy(tmp_path)


def test_dense_tied_bf16_round_trip(tokenizer, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    legacy = save_legacy(model, tokenizer, tmp_path / "dense")  # no R-Sparse layer: converts as a dense model
    loaded, _, _, _ = read_legacy(legacy)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = windows[:32][None]
    assert torch.equal(model(x).logits, loaded(x).logits)
