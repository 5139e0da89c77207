"""rsparse.progress: a tqdm bar on a terminal; in a log one line per phase, when it ends."""

import io
import re

import pytest

from rsparse.progress import Phase, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture()
def enabled(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py sets it


def test_off_a_terminal_one_line_when_the_phase_ends(enabled):
    log = io.StringIO()
    bar = progress(range(16), desc="calibration", unit="batch", leave=False, file=log)
    assert isinstance(bar, Phase)
    for i in bar:
        assert log.getvalue() == ""  # nothing per step
    assert re.fullmatch(r"calibration: 16 batches in \d+\.\d s\n", log.getvalue())


def test_off_a_terminal_by_hand_and_stopped_short(enabled):
    log = io.StringIO()
    bar = progress(total=5, desc="sparsify (rsparse)", unit="layer", file=log)
    bar.update()
    bar.set_postfix(best="1.0")
    bar.close()
    bar.close()  # once only
    for _ in progress(["a", "b", "c"], desc="search", unit="generation", file=log):
        break
    lines = log.getvalue().splitlines()
    assert re.fullmatch(r"sparsify \(rsparse\): 1 layer in \d+\.\d s \(stopped at 1 of 5\)", lines[0])
    assert re.fullmatch(r"search: 0 generations in \d+\.\d s \(stopped at 0 of 3\)", lines[1])
    assert len(lines) == 2


def test_on_a_terminal_a_tqdm_bar(enabled):
    from tqdm.auto import tqdm

    screen = Terminal()
    bar = progress(range(4), desc="perplexity", unit="batch", file=screen)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3]
    assert "\r" in screen.getvalue() and "perplexity" in screen.getvalue() and "4/4" in screen.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_tqdm_disable_silences_both(stream, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = stream()
    assert list(progress(range(3), desc="calibration", unit="batch", file=out)) == [0, 1, 2]
    bar = progress(total=2, desc="search", file=out)
    bar.update(2)
    bar.close()
    assert out.getvalue() == ""


def test_disable_silences_both(enabled):
    for stream in (io.StringIO(), Terminal()):
        assert list(progress(range(3), desc="quantizing", disable=True, file=stream)) == [0, 1, 2]
        assert stream.getvalue() == ""
