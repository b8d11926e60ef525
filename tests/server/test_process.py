"""Process-wide settings of `genserve serve`: the GIL switch interval, the malloc arena cap, the settled heap."""

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


SETTLE = """
import gc, weakref
from genserve.server.process import release_heap, settle_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

kept = [cycle() for _ in range(100)]
gone = weakref.ref(cycle())  # unreachable, only a collection frees it
before = gc.get_threshold()
settle_heap()
assert gc.get_threshold()[0] >= 7000 and gc.get_threshold()[1:] == before[1:], gc.get_threshold()
assert gone() is None, "settle_heap left an unreachable cycle"
assert gc.get_freeze_count() >= 200, gc.get_freeze_count()
assert not any(kept[0] is o for o in gc.get_objects()), "a live object stayed in the collector's generations"
dropped = weakref.ref(kept.pop())  # frozen at the last settle, unreachable now
settle_heap()
assert dropped() is None, "an object frozen earlier and dropped since was never collected"
release_heap()
assert gc.get_freeze_count() == 0
assert gc.get_threshold() == before
print("ok")
"""


def test_settle_heap_collects_then_freezes_and_a_later_settle_frees_what_was_dropped() -> None:
    out = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


SERVE = """
import asyncio, gc, sys
from pathlib import Path
from genserve.server.app import Server
from genserve.server.config import ServerConfig

async def main(owns):
    cfg = ServerConfig(repo=Path(sys.argv[1]), host="127.0.0.1", port=0, metrics_port=0, provider="cpu",
                       model_control="explicit", load_models=sys.argv[2], grace_s=2.0)
    server = Server()
    server.owns_process = owns
    await server.start(cfg)
    started = gc.get_freeze_count()
    await server.load_model(sys.argv[3])
    loaded = gc.get_freeze_count()
    before = server.metrics.value("genserve_gc_pause_seconds_count", {"generation": "2"}) or 0
    gc.collect()
    gc.collect()
    timed = (server.metrics.value("genserve_gc_pause_seconds_count", {"generation": "2"}) or 0) - before
    await server.stop()
    gc.collect()  # after stop: no longer timed
    after = (server.metrics.value("genserve_gc_pause_seconds_count", {"generation": "2"}) or 0) - before
    print(started, loaded, gc.get_freeze_count(), int(timed), int(after))

asyncio.run(main(sys.argv[4] == "owns"))
"""


@pytest.mark.parametrize("owns", ["owns", "embedded"])
def test_a_server_that_owns_its_process_freezes_its_heap_while_it_serves(repo_dir: Path, owns: str) -> None:
    """`serve` settles the heap once the models are loaded and after each change (here a second model loaded,
    whose objects are frozen too), and times the collections into genserve_gc_pause_seconds while it serves; a
    server started inside another program leaves that program's heap and its collector alone."""
    out = subprocess.run([sys.executable, "-c", SERVE, str(repo_dir), "digits-realnvp", "digits-vae", owns],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    started, loaded, stopped, timed, after = map(int, out.stdout.split())
    if owns == "owns":
        assert started > 10_000  # the modules, the model and its ONNX Runtime session
        assert loaded > started  # settled again with the second model
        assert stopped == 0
        assert timed == 2 and after == 2  # genserve_gc_pause_seconds timed both collections, and none after stop
    else:
        assert started == loaded == stopped == timed == after == 0
