"""CPU seconds of a server and every process below it (MLServer's workers, Triton's server and backend stub).

From /proc, as benchmarks/procstat.py reads one process; a process that ends between two readings drops out,
so a tree's figure is the CPU of the processes alive at both readings.
"""

from __future__ import annotations

import os

from benchmarks import procstat


def tree(root: int) -> list[int]:
    """``root`` and its descendants, by parent pid (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2:].split()[1])  # field 4 of stat(5)
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds so far of each live process of the tree, by pid."""
    out = {}
    for pid in tree(root):
        s = procstat.process_cpu_s(pid)
        if s is not None:
            out[pid] = s
    return out


def cores_between(a: dict[int, float], b: dict[int, float], wall_s: float) -> float:
    """Cores the tree used between two readings, over the processes present in both."""
    return sum(b[p] - a[p] for p in a.keys() & b.keys()) / max(wall_s, 1e-9)
