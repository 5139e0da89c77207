import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TIERS = ("cli", "real_model", "kernel")
# The runtime's tests (owned by rsparse/runtime) carry the kernel tier by their file: the R-Sparse
# kernel's (test_kernel_*.py) and the engine's.
KERNEL_FILES = ("test_kernel_", "test_engine.py")  # name prefixes


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name.startswith(KERNEL_FILES):
            item.add_marker(pytest.mark.kernel)
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A stitch in time saves nine. "
        "Rivers flow to the sea, and clouds carry the water back to the mountains. ") * 40


def tiny_config(arch: str = "llama"):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    # Heavier-tailed weights than the default init, so activations look more like an LLM's.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_model()


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer):
    """The tiny model and tokenizer saved as a local model directory, for the CLI's --model."""
    path = tmp_path / "tiny"
    tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def windows(tokenizer):
    from rsparse.core.data import tokenize_corpus

    stream = tokenize_corpus(tokenizer, [TEXT])
    return stream


@pytest.fixture(autouse=True)
def _unit_tier_one_thread(request):
    """Unit tests run tiny matmuls on one thread: fastest, and on a shared 2-core machine immune to
    other processes (two threads waiting for a busy core run many times slower)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest and immune to other processes on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def data(windows):
    """(calibration windows, held-out perplexity windows) of 64 tokens from the tiny corpus."""
    from rsparse.core.data import calibration_windows, perplexity_windows

    return calibration_windows(windows, 64, 8, seed=0), perplexity_windows(windows[3000:], 64, 6)


def read_fraction(budgets) -> float:
    """Model-level fraction of the decoder projections' weight elements read under the budgets."""
    total = sum(b.dense_elements for b in budgets)
    return sum(b.read_fraction() * b.dense_elements for b in budgets) / total


def cli_error(capsys, argv: list[str], match: str) -> str:
    """Run the `rsparse` command, expect the one-line error of an expected failure (exit status 2)
    whose message matches `match`; returns the message."""
    import re

    from rsparse.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit status {code}, stderr: {err}"
    assert err and err[-1].startswith("error: "), err
    assert re.search(match, err[-1]), f"{match!r} not in {err[-1]!r}"
    assert "Traceback" not in "\n".join(err)
    return err[-1]
