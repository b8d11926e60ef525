"""Progress bars: drawn on a terminal, never into a pipe or a log file."""

from __future__ import annotations

import io
import sys

import pytest

from genserve.clients.client import _progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr, drawn", [(io.StringIO(), False), (_Terminal(), True)], ids=["pipe", "terminal"])
def test_a_bar_is_drawn_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, stderr: io.StringIO,
                                           drawn: bool) -> None:
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = _progress(100, "scoring", enabled=True)
    assert bar.disable is not drawn  # close() sets disable: read it first
    bar.update(50)
    bar.close()
    assert ("scoring" in stderr.getvalue()) is drawn


def test_disabled_means_no_bar_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = _progress(10, "sampling", enabled=False)
    assert bar.disable
    bar.close()
    assert sys.stderr.getvalue() == ""
