"""Process-wide settings of a server process: the GIL switch interval and glibc's malloc arenas.

Both belong to the process, not to one Server object, so ``serve`` (the entry point that owns the process)
applies them once at start; servers started inside another program (tests, notebooks) leave them alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("genserve.server")

M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the most malloc arenas (malloc.h)."""


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
