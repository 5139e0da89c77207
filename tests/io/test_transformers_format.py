"""rsparse.io.transformers_format: save_pretrained -> AutoModelForCausalLM.from_pretrained round trips
(bit-identical logits), shards, refusals of damaged directories, the CLI, lm-eval."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import rsparse
from conftest import cli_error, tiny_config, tiny_model
from rsparse import RSparseConfig, restore_, sparsify_
from rsparse.core.data import calibration_windows
from rsparse.core.layer import rsparse_layers
from rsparse.core.sparse_modules import set_token_mode
from rsparse.errors import CheckpointError, CheckpointFileMissing
from rsparse.io.checkpoint import load_any
from rsparse.io import checkpoint
from rsparse.io import transformers_format as tf

pytestmark = pytest.mark.usefixtures("one_thread")


def sparsify(model, windows, **kw):
    cal = calibration_windows(windows, 64, 4, seed=0)
    kw = {"ratio": 0.8, **kw}
    config = RSparseConfig(sparsity=0.5, seq_len=64, calibration_samples=4, max_rows_per_layer=256, **kw)
    return sparsify_(model, config, cal), config


@pytest.fixture(scope="module")
def base(tokenizer, windows, tmp_path_factory):
    """A tiny model sparsified with every token sparse (shared: do not change it), and its directory."""
    model = tiny_model()
    sparsify(model, windows, tokens="all")
    path = tmp_path_factory.mktemp("hf") / "tiny-rsparse"
    rsparse.save_pretrained(model, tokenizer, path)
    return model, path


@pytest.fixture()
def saved(base, tmp_path):
    """The shared model and a private copy of its directory (tests may damage it)."""
    model, path = base
    return model, Path(shutil.copytree(path, tmp_path / "m"))


def test_round_trip_through_auto_model_is_bit_identical(base, windows):
    model, path = base
    loaded = AutoModelForCausalLM.from_pretrained(path)  # `import rsparse` registered the quantizer
    x = windows[:48][None]
    assert torch.equal(model(x).logits, loaded(x).logits)  # tokens="all": every position sparse
    src = {l.name: l for l in rsparse_layers(model)}
    layers = rsparse_layers(loaded)
    assert len(layers) == 14 and {l.tokens for l in layers} == {"all"}
    for l in layers:
        s = src[l.name]
        assert (l.method, l.tokens, l.keep_fraction, l.rank) == (s.method, s.tokens, s.keep_fraction, s.rank)
        assert l.weight.stride() == (1, l.out_features) == s.weight.stride()  # column-major, as sparsify_ leaves it
        for b in ("threshold", "score_scale", "lr_down", "lr_up"):
            assert torch.equal(getattr(l, b), getattr(s, b)) and getattr(l, b).dtype == getattr(s, b).dtype
    for mode in ("decode", "second_half"):  # the other token modes agree too
        set_token_mode(model, mode)
        set_token_mode(loaded, mode)
        try:
            assert torch.equal(model(x).logits, loaded(x).logits), mode
        finally:
            set_token_mode(model, "all")
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "rsparse" and qc["format_version"] == tf.FORMAT_VERSION
    assert qc["layers"]["model.layers.0.self_attn.k_proj"] == {
        "method": "rsparse", "tokens": "all", "keep_fraction": src["model.layers.0.self_attn.k_proj"].keep_fraction,
        "rank": src["model.layers.0.self_attn.k_proj"].rank, "shape": [32, 64], "bias": False,
        "sha256": qc["layers"]["model.layers.0.self_attn.k_proj"]["sha256"]}
    assert qc["rsparse_config"]["sparsity"] == 0.5 and qc["summary"]["target_sparsity"] == 0.5
    assert {"torch", "transformers", "rsparse"} <= set(qc["versions"])
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    card = (path / "README.md").read_text()
    assert "library_name: transformers" in card and "| target sparsity | 50.0% |" in card
    assert 'AutoModelForCausalLM.from_pretrained("tiny-rsparse"' in card and "import rsparse" in card


def test_plain_save_pretrained_dtype_and_device_map(base, windows, tmp_path):
    model, _ = base
    model.save_pretrained(tmp_path / "plain")  # no rsparse call: sparsify_ attached the quantizer
    x = windows[:40][None]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", device_map="cpu")
    assert torch.equal(model(x).logits, loaded(x).logits)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    layer = rsparse_layers(half)[0]
    assert half.dtype == torch.bfloat16 and layer.lr_down.dtype == torch.bfloat16
    assert layer.threshold.dtype == layer.score_scale.dtype == torch.float32  # kept in float32, as sparsify_ makes them
    assert layer.weight.stride() == (1, layer.out_features)
    # re-saving a loaded model keeps the format (and the logits)
    half.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert again.dtype == torch.bfloat16 and torch.equal(again(x).logits, half(x).logits)


def test_sharded_save_loads(base, tokenizer, windows, tmp_path):
    model, _ = base
    path = rsparse.save_pretrained(model, tokenizer, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    loaded, tok = load_any(path)
    assert tok is not None and len(rsparse_layers(loaded)) == 14
    x = windows[:40][None]
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_dense_after_restore_rank_zero_tied_bf16_and_bias(tokenizer, windows, tmp_path):
    # sparse-only layers have rank 0 (empty factor tensors); tied embeddings; bfloat16; Qwen2 biases
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    sparsify(model, windows, method="sparse", tokens="all")
    assert {l.rank for l in rsparse_layers(model)} == {0}
    loaded, _ = load_any(rsparse.save_pretrained(model, tokenizer, tmp_path / "q"))
    x = windows[:40][None]
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(model(x).logits, loaded(x).logits)
    restore_(loaded)  # dense again: a plain transformers model, no quantization_config
    assert getattr(loaded.config, "quantization_config", None) is None and loaded.hf_quantizer is None
    loaded.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not rsparse_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))


# -- refusals ------------------------------------------------------------------------------------------
def edit_config(path, fn, forge: bool = True):
    """Edit config.json; forge: also drop its integrity record (as a directory written before the
    record existed), so that the deeper checks behind the hashes are what is tested."""
    config = json.loads((path / "config.json").read_text())
    fn(config)
    if forge:
        config["quantization_config"].pop("integrity", None)
    (path / "config.json").write_text(json.dumps(config))


def test_an_edited_config_is_refused_by_its_hash(saved):
    _, path = saved
    edit_config(path, lambda c: c.update(rms_norm_eps=0.5), forge=False)
    refused(path, "config.json does not match its recorded sha256")


def refused(path, match, kind=CheckpointError):
    """Both loaders refuse with the same clear error, before building anything."""
    with pytest.raises(kind, match=match):
        load_any(path)
    with pytest.raises(kind, match=match):
        AutoModelForCausalLM.from_pretrained(path)


def test_truncated_shard_is_refused(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    refused(path, "truncated")


def test_missing_shard_is_refused(base, tokenizer, tmp_path):
    path = rsparse.save_pretrained(base[0], tokenizer, tmp_path / "s", max_shard_size="40KB")
    (path / "model-00002-of-{:05d}.safetensors".format(len(list(path.glob("model-*"))))).unlink()
    refused(path, "model-00002-of-.* is missing", CheckpointFileMissing)


def test_edited_tensor_bytes_are_refused(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5000:-4990] = bytes(b ^ 0xFF for b in data[-5000:-4990])
    f.write_bytes(bytes(data))
    refused(path, "sha256")
    loaded, _ = checkpoint.load(path, verify=False)  # the hash alone can be skipped; everything else is still checked
    assert len(rsparse_layers(loaded)) == 14


def test_config_that_does_not_match_the_tensors_is_refused(saved):
    _, path = saved
    original = (path / "config.json").read_text()
    name = "model.layers.0.mlp.down_proj"
    cases = [(lambda c: c.update(intermediate_size=128), "does not match the model config"),
             (lambda c: c["quantization_config"]["layers"][name].update(rank=7), "files do not match the config"),
             (lambda c: c["quantization_config"]["layers"].pop(name), "lists no R-Sparse layer"),
             (lambda c: c["quantization_config"]["layers"].update({"model.layers.0.mlp.x_proj": c["quantization_config"]["layers"][name]}),
              "x_proj"),
             (lambda c: c["quantization_config"].update(format_version=tf.FORMAT_VERSION + 1), "upgrade rsparse"),
             (lambda c: c["quantization_config"]["layers"][name].update(method="magic"), "malformed")]
    for fn, match in cases:
        edit_config(path, fn)
        refused(path, match)
        (path / "config.json").write_text(original)
    load_any(path)


def test_dense_model_cannot_be_sparsified_while_loading(tiny_model_dir):
    with pytest.raises(CheckpointError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=tf.RSparseQuantizationConfig())


# -- CLI -----------------------------------------------------------------------------------------------
def run_cli(argv):
    from rsparse.cli import main

    return main(argv)


def test_cli_compress_then_generate_on_the_directory(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "c"
    assert run_cli(["compress", "--model", str(tiny_model_dir), "--out", str(out), "--calib-corpus", str(text_file),
                    "--calib-samples", "2", "--seq-len", "32", "--ppl-corpus", str(text_file), "--ppl-windows", "2",
                    "--max-shard-size", "60KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert "| perplexity |" in (out / "README.md").read_text() and "not measured" not in (out / "README.md").read_text()
    capsys.readouterr()
    assert run_cli(["generate", "--model", str(out), "--prompt", "The quick brown fox", "--max-new-tokens", "5",
                    "--no-chat-template"]) == 0
    err = capsys.readouterr().err
    assert "rsparse checkpoint, 14 R-Sparse layers" in err and "tokens/s" in err
    run = ["run", "--model", str(out), "--calib-corpus", str(text_file), "--ppl-corpus", str(text_file),
           "--seq-len", "16", "--calib-samples", "1", "--ppl-windows", "1", "--out", str(tmp_path / "run")]
    assert run_cli(run[:3] + ["--methods", "dense,sparse"] + run[3:]) == 0  # starts from the directory's dense weights
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"][0]["method"] == "dense"
    (out / "model-00001-of-{:05d}.safetensors".format(len(list(out.glob("model-*"))))).unlink()
    cli_error(capsys, ["generate", "--model", str(out), "--prompt", "x", "--max-new-tokens", "2"],
              "model-00001-of-.* is missing")
    cli_error(capsys, run[:3] + ["--methods", "dense", "--overwrite"] + run[3:], "is missing")  # verbs loading through load_model too


# -- lm-eval ---------------------------------------------------------------------------------------------
def test_lm_eval_api_scores_the_loaded_model_as_the_in_memory_one(base, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from rsparse.eval.hub import datasets_offline
    from rsparse.eval.tasks import write_offline_tasks

    model, path = base
    loaded = AutoModelForCausalLM.from_pretrained(path)
    tok = checkpoint.load(path)[1]
    tasks = [str(p) for p in write_offline_tasks(tmp_path / "tasks", ["piqa", "arc_easy"]).values()]
    results = []
    for m in (model, loaded):
        lm = HFLM(pretrained=m, tokenizer=tok, batch_size=1, device="cpu")
        with datasets_offline():
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=3, log_samples=True,
                                          task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
                                          random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
        results.append(out)
    a, b = results
    for task in ("piqa", "arc_easy"):
        assert isinstance(a["results"][task]["acc,none"], float)
        assert a["results"][task]["acc,none"] == b["results"][task]["acc,none"]
        ll_a = [s["resps"] for s in a["samples"][task]]
        ll_b = [s["resps"] for s in b["samples"][task]]
        assert len(ll_a) == 3 and all(isinstance(r[0][0], float) for s in ll_a for r in s)
        assert ll_a == ll_b  # the same log-likelihoods, bit for bit


# -- the embedded model ----------------------------------------------------------------------------------
def test_embedded_smollm2_round_trip(tmp_path):
    """SmolLM2-135M (GGUF, dequantised), every token sparse: save_pretrained -> from_pretrained, same logits."""
    from rsparse import load_model, load_windows

    model, tok = load_model()
    cal = load_windows(tok, "coqa", 128, 2, "calibration")
    sparsify_(model, RSparseConfig(sparsity=0.5, ratio=0.95, tokens="all", seq_len=128, calibration_samples=2,
                                   max_rows_per_layer=256, refine=False), cal)
    path = rsparse.save_pretrained(model, tok, tmp_path / "smollm", max_shard_size="200MB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu")
    assert len(rsparse_layers(loaded)) == 210 and loaded.dtype == torch.float32
    x = tok("The capital of France is Paris. Rivers flow to the sea and clouds carry the water back.",
            return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
