"""Process-wide settings of a server process: the GIL switch interval, glibc's malloc arenas, and the heap
that the garbage collector scans.

They belong to the process, not to one Server object, so ``serve`` (the entry point that owns the process)
applies them; servers started inside another program (tests, notebooks) leave them alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

log = logging.getLogger("genserve.server")

M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the most malloc arenas (malloc.h)."""

YOUNG_THRESHOLD = 7000
"""Allocations between collections of the youngest generation while a server is settled (``settle_heap``)."""

_threshold: tuple[int, ...] | None = None  # Python's thresholds while settled, restored by release_heap


def apply_process_settings(switch_interval_ms: float, malloc_arena_max: int) -> None:
    """Set the GIL switch interval (ms) and, on glibc, cap malloc arenas (0 leaves glibc's default: 8 per core).

    Under many concurrent clients each ONNX Runtime and gRPC thread that allocates grows an arena of its own,
    memory that glibc keeps after the peak; two arenas keep resident memory flat (as MALLOC_ARENA_MAX=2 does).
    """
    sys.setswitchinterval(switch_interval_ms / 1000.0)
    if malloc_arena_max <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.mallopt(M_ARENA_MAX, int(malloc_arena_max)):
            log.warning("mallopt(M_ARENA_MAX, %d) was refused; malloc arenas keep glibc's default",
                        malloc_arena_max)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to cap
        log.info("no glibc mallopt here; malloc_arena_max has no effect")


def settle_heap() -> None:
    """Collect, then freeze what is left (``gc.freeze``): the modules, models and sessions that live as long as
    the server leave the collector's generations, so its full collections scan only what requests create.

    Under load they are frequent: every call in flight when a younger collection runs is promoted to the oldest
    generation, and once those promotions pass a quarter of it Python collects it whole. With the server's
    ~50,000 long-lived objects there, each such collection held the event loop for 10 to 14 ms, several times
    a second at 64 clients (BENCHMARKS.md: the p99 of 1-row requests went from 26 to 14 ms). ``serve`` calls
    this once its models are loaded and after every change to them; unfreezing first lets the collector find
    what an unloaded model left in cycles, so nothing frozen earlier stays for good.

    The youngest generation is collected every ``YOUNG_THRESHOLD`` allocations instead of Python's 700: grpc.aio
    leaves a small cycle behind every RPC (its method lookup's closure), and a collection every few requests
    cost 5% of the requests/s at 64 clients (BENCHMARKS.md); the cycles wait a little longer, about 1 MB at most.
    """
    global _threshold
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if _threshold is None:
        _threshold = gc.get_threshold()
        gc.set_threshold(max(YOUNG_THRESHOLD, _threshold[0]), *_threshold[1:])


def release_heap() -> None:
    """Undo ``settle_heap`` (the server is stopping): frozen objects go back to the collector's generations,
    and its thresholds are Python's again."""
    global _threshold
    gc.unfreeze()
    if _threshold is not None:
        gc.set_threshold(*_threshold)
        _threshold = None
