"""rsparse.io.checkpoint: save / load round trips (bit-identical logits), errors, atomic saves, CLI compress."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, tiny_model
from rsparse import RSparseConfig, sparsify_
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import CheckpointError, CheckpointFileMissing
from rsparse.io import manifest as ckpt
from rsparse.io.checkpoint import load, load_any, save
from rsparse.core.data import calibration_windows


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
    """A sparsified tiny model (shared, do not change it) and a pristine checkpoint of it."""
    model = tiny_model()
    report, config = sparsify(model, windows)
    return model, save(model, tokenizer, tmp_path_factory.mktemp("base") / "ck", report=report, config=config)


@pytest.fixture()
def saved(base, tmp_path):
    """The shared sparsified model and a private copy of its checkpoint (tests may damage it)."""
    model, path = base
    return model, Path(shutil.copytree(path, tmp_path / "ck"))


def test_sparse_round_trip_is_bit_identical(saved, windows, monkeypatch):
    model, path = saved

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint is loaded without torch.load (nothing is unpickled)")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, tok = load(path)
    x = windows[:48][None]
    same_logits(model, loaded, x)
    src = {l.name: l for l in rsparse_layers(model)}
    layers = rsparse_layers(loaded)
    assert len(layers) == 14
    for l in layers:
        s = src[l.name]
        assert (l.method, l.tokens, l.keep_fraction, l.rank) == (s.method, s.tokens, s.keep_fraction, s.rank)
        assert l.weight.stride() == (1, l.out_features) == s.weight.stride()  # column-major
        for b in ("threshold", "score_scale", "lr_down", "lr_up"):
            assert torch.equal(getattr(l, b), getattr(s, b)) and getattr(l, b).dtype == getattr(s, b).dtype
    manifest = json.loads((path / "rsparse.json").read_text())
    assert manifest["format_version"] == ckpt.FORMAT_VERSION and manifest["sparsified"]
    assert manifest["rsparse_config"]["sparsity"] == 0.5 and len(manifest["report"]) == 14
    assert {"torch", "transformers", "rsparse"} <= set(manifest["versions"])
    assert manifest["layers"][1] == {"name": "model.layers.0.self_attn.k_proj", "method": "rsparse", "tokens": "decode",
                                     "keep_fraction": src["model.layers.0.self_attn.k_proj"].keep_fraction,
                                     "rank": src["model.layers.0.self_attn.k_proj"].rank, "shape": [32, 64],
                                     "bias": False}
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_generate_works_after_load(saved, windows):
    model, path = saved
    loaded, tok = load(path)
    prompt = windows[:12][None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    out = loaded.generate(prompt, **kw)
    assert out.shape == (1, 18)
    assert torch.equal(out, model.generate(prompt, **kw))
    assert tok.decode(out[0]) == tok.decode(out[0])  # the tokenizer came back too


def test_dense_and_tied_bf16_round_trip(tokenizer, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = save(model, tokenizer, tmp_path / "dense")
    manifest = json.loads((path / "rsparse.json").read_text())
    assert manifest["layers"] == [] and not manifest["sparsified"] and manifest["model"]["dtype"] == "bfloat16"
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = load(path)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = windows[:32][None]
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_qwen2_with_bias_round_trip(tokenizer, windows, tmp_path):
    model = tiny_model("qwen2")
    report, config = sparsify(model, windows, tokens="all")
    loaded, _ = load(save(model, tokenizer, tmp_path / "q", report=report, config=config))
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    same_logits(model, loaded, windows[:40][None], modes=("all",))


def test_load_any_falls_back_to_load_model(model, tokenizer, saved, tmp_path):
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    plain, _ = load_any(hf)
    assert not rsparse_layers(plain)
    sparse, _ = load_any(saved[1])
    assert len(rsparse_layers(sparse)) == 14


# -- errors -----------------------------------------------------------------------------------


def test_missing_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointFileMissing, match="not found"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointFileMissing, match="rsparse.json is missing"):
        load(tmp_path)
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        data = (path / name).read_bytes()
        (path / name).unlink()
        with pytest.raises(CheckpointFileMissing, match=f"{name} is missing"):
            load(path)
        (path / name).write_bytes(data)
    load(path)


def test_truncated_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_edited_tensor_bytes(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5000:-4990] = bytes(b ^ 0xFF for b in data[-5000:-4990])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load(path)


def test_broken_header_is_reported_even_with_a_matching_hash(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (10 ** 12).to_bytes(8, "little")  # header length beyond the file
    f.write_bytes(bytes(data))
    manifest = json.loads((path / "rsparse.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = ckpt._sha256(f)
    (path / "rsparse.json").write_text(json.dumps(manifest))
    reseal(path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load(path)


def reseal(path):
    """Forge the manifest's own hash too, so that the deeper checks behind it are what is tested."""
    (path / "rsparse.json.sha256").write_text(ckpt._sha256(path / "rsparse.json"))


def edit_manifest(path, fn):
    m = json.loads((path / "rsparse.json").read_text())
    fn(m)
    (path / "rsparse.json").write_text(json.dumps(m))
    reseal(path)


def test_layer_list_must_match(saved):
    _, path = saved
    original = (path / "rsparse.json").read_text()
    edit_manifest(path, lambda m: m["layers"][0].update(name="model.layers.0.self_attn.x_proj"))
    with pytest.raises(CheckpointError, match="x_proj"):
        load(path)
    (path / "rsparse.json").write_text(original)
    reseal(path)
    edit_manifest(path, lambda m: m["layers"][2].update(shape=[64, 64]))
    with pytest.raises(CheckpointError, match="shape"):
        load(path)
    (path / "rsparse.json").write_text(original)
    reseal(path)
    edit_manifest(path, lambda m: m["layers"].pop(3))  # its lr_down etc. become unexpected tensors
    with pytest.raises(CheckpointError, match="do not match the model"):
        load(path)
    (path / "rsparse.json").write_text(original)
    reseal(path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json does not match its recorded sha256"):
        load(path)  # an edited config.json is refused by its hash ...
    edit_manifest(path, lambda m: m["other_sha256"].update({"config.json": ckpt._sha256(path / "config.json")}))
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load(path)  # ... and, with the hash forged too, by the layer list


def test_newer_format_version(saved):
    _, path = saved
    edit_manifest(path, lambda m: m.update(format_version=ckpt.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade rsparse"):
        load(path)
    edit_manifest(path, lambda m: m.update(format="something-else"))
    with pytest.raises(CheckpointError, match="not an rsparse checkpoint"):
        load(path)


# -- saving -------------------------------------------------------------------------------------


def test_refuses_non_empty_non_checkpoint_directory(base, tokenizer, tmp_path):
    model = base[0]
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="overwrite"):
        save(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me"
    save(model, tokenizer, target, overwrite=True)
    assert not (target / "notes.txt").exists() and ckpt.is_checkpoint(target)
    save(model, tokenizer, target)  # an existing checkpoint is replaced without overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save(model, tokenizer, tmp_path / "file")


def test_failed_save_keeps_the_previous_checkpoint(saved, tokenizer, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(model, tokenizer, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left
    load(path)
