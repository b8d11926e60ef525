"""Per-cell medians over rounds, genserve over the best peer, the issue's targets, and the markdown table.

A cell is (rows per request, clients). Each round measures every server once per cell, so the ratio
genserve / best peer is taken within each round (the servers saw the same machine within seconds) and its
median over rounds reported. The best peer of a cell is the peer with the highest median requests/s there.

Targets (issue 17, point 4): at 8 and 64 clients, genserve >= 1.5x the best peer's requests/s with a p99 no
higher than that peer's; at 1 client, requests/s no lower than the best peer's.

The grpc.aio floor (``FLOOR``, runtimes/grpc_floor.py) is a reference, never the best peer: its ratio to the best
peer is the most a server written on Python's grpc.aio can reach in that cell. Where it is below the cell's
target, no such server meets the target on this machine.
"""

from __future__ import annotations

import math
import statistics

GENSERVE = "genserve"
TARGET_RATIO = 1.5
"""genserve / best peer requests/s wanted at 8 and 64 clients."""
FLOOR = "grpc-floor"
"""The grpc.aio floor: a reference server measured beside the peers, never a peer."""


def is_own(name: str) -> bool:
    """genserve itself or one of its variants (``genserve-<name>``: other serve flags), never a peer."""
    return name == GENSERVE or name.startswith(GENSERVE + "-")


def is_peer(name: str) -> bool:
    """A server genserve is compared with: neither genserve (or a variant) nor the grpc.aio floor."""
    return not is_own(name) and name != FLOOR


def target_of(clients: int) -> float | None:
    """The ratio to the best peer wanted at this client count (None: no target there)."""
    return 1.0 if clients == 1 else TARGET_RATIO if clients in (8, 64) else None


def floor_note(clients: int, ratio: float) -> str:
    """What the floor's ratio to the best peer says about the cell's target."""
    target = target_of(clients)
    if target is None or math.isnan(ratio):
        return ""
    if ratio < target:
        return f"target out of reach for a grpc.aio server here (the floor is {ratio:.2f}x < {target:g}x)"
    return f"within a grpc.aio server's reach (the floor is {ratio:.2f}x >= {target:g}x)"


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def cell_stats(samples: list[dict], server: str, rows: int, clients: int) -> dict | None:
    """Medians over rounds of one server in one cell; None when it was not measured there."""
    mine = [s for s in samples if (s["server"], s["rows"], s["clients"]) == (server, rows, clients)]
    if not mine:
        return None
    return {"server": server, "rows": rows, "clients": clients, "rounds": len(mine),
            "rps": _median([s["rps"] for s in mine]), "p50_ms": _median([s["p50_ms"] for s in mine]),
            "p99_ms": _median([s["p99_ms"] for s in mine]),
            "server_cores": _median([s.get("server_cores") for s in mine]),
            "req_per_cpu_s": _median([s["rps"] / s["server_cores"] for s in mine if s.get("server_cores")]),
            "top_thread": statistics.mode([s.get("top_thread", "?") for s in mine]),
            "top_thread_cores": _median([s.get("top_thread_cores") for s in mine]),
            "loadgen_cores": _median([s.get("loadgen_cores") for s in mine]),
            "machine_busy_cores": _median([s.get("machine_busy_cores") for s in mine]),
            "errors": sum(sum(s["errors"].values()) for s in mine)}


def verdict(clients: int, ratio: float, p99_ratio: float) -> str:
    """The issue's target for a cell: met / missed (with what missed), or no target at this client count."""
    if math.isnan(ratio):
        return "no peer measured"
    target = target_of(clients)
    if target is None:
        return "no target"
    if clients == 1:  # no wait for company: requests/s alone, p99 not part of it
        return "met" if ratio >= target else f"missed ({ratio:.3f}x < {target:g}x)"
    misses = []
    if ratio < target:
        misses.append(f"{ratio:.2f}x < {target}x")
    if p99_ratio > 1.0:
        misses.append(f"p99 {p99_ratio:.2f}x of the peer's")
    return "met" if not misses else "missed (" + "; ".join(misses) + ")"


def summarise(samples: list[dict], servers: list[str], rows: list[int], clients: list[int]) -> list[dict]:
    """One entry per cell: each server's medians, the best peer, the ratio and the verdict."""
    out = []
    for r in rows:
        for c in clients:
            stats = {name: st for name in servers if (st := cell_stats(samples, name, r, c)) is not None}
            peers = {k: v for k, v in stats.items() if is_peer(k) and v["rps"] > 0}
            best = max(peers, key=lambda k: peers[k]["rps"]) if peers else None
            rounds: dict[int, dict[str, dict]] = {}  # round -> server -> its sample in this cell
            for s in samples:
                if (s["rows"], s["clients"]) == (r, c):
                    rounds.setdefault(s["round"], {})[s["server"]] = s
            tops = {k: max((s["rps"] for name, s in here.items() if is_peer(name)), default=0.0)
                    for k, here in rounds.items()}  # each round's best peer
            cell = {"rows": r, "clients": c, "servers": stats, "best_peer": best}
            if FLOOR in stats:
                cell["floor_ratio"] = _median([here[FLOOR]["rps"] / tops[k] for k, here in sorted(rounds.items())
                                               if FLOOR in here and tops[k] > 0])
            for own in [n for n in servers if is_own(n)]:
                ratio = _median([here[own]["rps"] / tops[k] for k, here in sorted(rounds.items())
                                 if own in here and tops[k] > 0])
                mine = stats.get(own)
                p99_ratio = (mine["p99_ms"] / peers[best]["p99_ms"] if mine and best and peers[best]["p99_ms"]
                             else math.nan)
                figures = {"ratio": ratio,
                           "ratio_of_medians": mine["rps"] / peers[best]["rps"] if mine and best else math.nan,
                           "p99_ratio": p99_ratio, "verdict": verdict(c, ratio, p99_ratio)}
                if own == GENSERVE:
                    cell.update(figures)
                else:
                    cell.setdefault("variants", {})[own] = figures
            out.append(cell)
    return out


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(table: list[dict], servers: list[str], status: dict[str, str]) -> str:
    """The table of BENCHMARKS.md: a line per server and cell, then genserve / best peer with the verdict."""
    lines = ["| rows | clients | server | req/s | p50 ms | p99 ms | server cores | busiest thread, cores | "
             "req per server CPU-s | load generator cores | machine cores | errors | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in table:
        r, c = cell["rows"], cell["clients"]
        for name in servers:
            st = cell["servers"].get(name)
            if st is None:
                lines.append(f"| {r} | {c} | {name} | not run: {status.get(name, 'not measured')} | | | | | | | | | |")
                continue
            lines.append(f"| {r} | {c} | {name} | {st['rps']:.0f} | {st['p50_ms']:.2f} | {st['p99_ms']:.2f} | "
                         f"{_num(st['server_cores'], '.2f')} | {st['top_thread']} "
                         f"{_num(st['top_thread_cores'], '.2f')} | {_num(st['req_per_cpu_s'], '.0f')} | "
                         f"{_num(st.get('loadgen_cores'), '.2f')} | {_num(st.get('machine_busy_cores'), '.2f')} | "
                         f"{st['errors']} | |")
        for own, figures in [(GENSERVE, cell), *cell.get("variants", {}).items()]:
            lines.append(f"| {r} | {c} | **{own} / best peer ({cell['best_peer'] or 'none'})** | "
                         f"**{_num(figures['ratio'], '.2f')}x** | | p99 {_num(figures['p99_ratio'], '.2f')}x | | | | | "
                         f"| | {figures['verdict']} |")
        if "floor_ratio" in cell:
            lines.append(f"| {r} | {c} | *{FLOOR} / best peer ({cell['best_peer'] or 'none'})* | "
                         f"*{_num(cell['floor_ratio'], '.2f')}x* | | | | | | | | | "
                         f"{floor_note(c, cell['floor_ratio'])} |")
    return "\n".join(lines)


if __name__ == "__main__":  # redraw the table of a result: python -m benchmarks.peers.summary RESULT.json
    import json
    import sys
    from pathlib import Path

    result = json.loads(Path(sys.argv[1]).read_text())
    names = [GENSERVE, *result.get("variants", {}), *result["pins"], FLOOR]
    names = [n for n in names if n in result["versions"] or n in result["status"]]
    table = summarise(result["samples"], names, sorted({s["rows"] for s in result["samples"]}),
                      sorted({s["clients"] for s in result["samples"]}))
    print(markdown(table, names, result["status"]))
    print(f"\n1-minute load average during the run: {result['load1_min_max'][0]:.1f} to "
          f"{result['load1_min_max'][1]:.1f}")
