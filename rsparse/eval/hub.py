"""Reaching the Hugging Face hub, or not: a quick reachability probe, offline mode for a block,
and held-out data that is skipped with a reason (rather than failing) when the hub is out of reach."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from functools import lru_cache

from rsparse.core.data import HUB_CORPORA, load_windows
from rsparse.errors import EvaluationError


@contextlib.contextmanager
def datasets_offline(enabled: bool = True):
    """HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 for the block (env and the already-imported
    libraries' flags), restored afterwards."""
    if not enabled:
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    patched = []
    for mod_name, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                            ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(mod_name)
        for a in attrs if mod is not None else ():
            if hasattr(mod, a):
                patched.append((mod, a, getattr(mod, a)))
                setattr(mod, a, True)
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for mod, a, v in patched:
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): whether the Hugging Face hub can be reached, decided within about
    `timeout` seconds (DNS and TCP connect in a daemon thread; never hangs)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return False, f"{var}=1 is set"
    return _probe_hub(timeout)


@lru_cache(maxsize=4)
def _probe_hub(timeout: float) -> tuple[bool, str]:
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: dict = {}

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if result.get("ok"):
        return True, f"{host} reachable"
    return False, f"{host} not reachable ({result.get('error') or f'no answer in {timeout:.0f} s'})"


def check_hub_for_tasks() -> None:
    """Fail fast when --hub-tasks cannot work: the hub is unreachable (unless the user set
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on purpose, to use datasets already in the local cache)."""
    ok, why = hub_status()
    if not ok and "is set" not in why:
        raise EvaluationError(f"hub tasks need the Hugging Face hub, which is not reachable ({why}); "
                              "leave out --hub-tasks to score the offline validation copies")


def perplexity_windows_or_skip(tokenizer, corpus: str = "wikitext2", seq_len: int = 512, windows: int = 0):
    """(windows, None) or (None, reason skipped). `windows` 0 = every window of the corpus.
    Hub corpora (wikitext2, c4) are skipped quickly when the hub is unreachable."""
    if corpus in (None, "", "none"):
        return None, "perplexity not requested"
    if corpus in HUB_CORPORA:
        ok, why = hub_status()
        if not ok:
            return None, f"{corpus} perplexity skipped: the Hugging Face hub is not reachable ({why}); " \
                         "use an offline corpus (e.g. --ppl-corpus boolq) for a perplexity offline"
    try:
        return load_windows(tokenizer, corpus, seq_len, windows or 10 ** 9, "perplexity"), None
    except (ConnectionError, OSError) as e:
        return None, f"{corpus} perplexity skipped: could not load it ({type(e).__name__}: {e})"
