"""Process-wide settings of `genserve serve`: the GIL switch interval and the malloc arena cap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from genserve.server.config import ServerConfig

PROBE = """
import sys, logging
logging.basicConfig(level=logging.INFO)
from genserve.server.process import apply_process_settings
apply_process_settings({ms}, {arenas})
print(sys.getswitchinterval())
"""


@pytest.mark.parametrize("ms, arenas", [(0.2, 2), (5.0, 0)])
def test_settings_apply_in_a_fresh_process(ms: float, arenas: int) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(ms=ms, arenas=arenas)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert float(out.stdout.strip()) == pytest.approx(ms / 1000)
    assert "refused" not in out.stderr  # glibc accepted the arena cap (or it was left alone)


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="switch_interval_ms"):
        ServerConfig(repo=tmp_path, switch_interval_ms=0)
    with pytest.raises(ValueError, match="malloc_arena_max"):
        ServerConfig(repo=tmp_path, malloc_arena_max=-1)
