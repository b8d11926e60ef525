"""PNG plots of benchmark results (matplotlib, Agg backend): the concurrency sweep and the ratio figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402


def _log_axes(a: plt.Axes, ticks: list[int], y: bool = False) -> None:
    """Log x axis labelled at the concurrency levels themselves (and a plain-number log y axis if ``y``)."""
    a.set_xscale("log")
    a.set_xticks(ticks, [str(t) for t in ticks])
    a.xaxis.set_minor_formatter(NullFormatter())
    if y:
        a.set_yscale("log")
        a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())


def sweep(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Four panels against concurrency: throughput, latency percentiles, server time split, CPU cores."""
    levels = result["levels"]
    c = [r["concurrency"] for r in levels]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    spec = result["spec"]
    fig.suptitle(title or f"{spec['model']} {spec['operation']}, {spec['rows']} row(s) per request")

    a = ax[0, 0]
    a.plot(c, [r["throughput_rps"] for r in levels], "o-", label="requests/s")
    if spec["rows"] != 1:
        a.plot(c, [r["throughput_rows_s"] for r in levels], "s--", label="rows/s")
    _log_axes(a, c)
    a.set(xlabel="concurrency (clients)", ylabel="throughput", title="throughput", ylim=(0, None))
    cores = [r["cpu"]["processes_cores"].get("server") for r in levels]
    if all(cores):
        # Requests per CPU-second of the server process: what the server does with the CPU it got, a rate
        # that other tenants of the machine do not distort.
        b = a.twinx()
        b.plot(c, [r["throughput_rps"] / k for r, k in zip(levels, cores, strict=True)], "^:", color="tab:green",
               label="requests per server CPU-s")
        b.set(ylabel="requests per server CPU-second", ylim=(0, None))
        b.legend(loc="lower right", fontsize=8)
    a.legend(loc="upper left")

    a = ax[0, 1]
    for p in ("p50", "p90", "p95", "p99"):
        a.plot(c, [r["latency_ms"][p] for r in levels], "o-", label=p)
    _log_axes(a, c, y=True)
    a.set(xlabel="concurrency (clients)", ylabel="ms", title="client latency")
    a.legend()

    a = ax[1, 0]
    parts = [("queue_s", "queue"), ("compute_s", "compute (ORT)"), ("other_s", "server other"),
             ("client_overhead_s", "network + client")]
    bottom = [0.0] * len(levels)
    x = range(len(levels))
    for key, label in parts:
        vals = [r["server"].get(key, 0.0) * 1e3 for r in levels]
        a.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a.set_xticks(list(x), [str(v) for v in c])
    a.set(xlabel="concurrency (clients)", ylabel="ms per request (mean)", title="where a request's time goes")
    a.legend(fontsize=8)

    a = ax[1, 1]
    cpu = [r["cpu"] for r in levels]
    a.plot(c, [k["machine_busy_cores"] for k in cpu], "k-", label="machine (all processes)")
    if any(k["processes_cores"].get("server") is not None for k in cpu):
        a.plot(c, [k["processes_cores"].get("server") or 0.0 for k in cpu], "o-", label="server process")
    a.plot(c, [sum(v or 0.0 for n, v in k["processes_cores"].items() if n.startswith("loadgen")) for k in cpu],
           "s-", label="load generator (all processes)")
    a.axhline(cpu[0]["cores"], color="grey", ls=":", label=f"{cpu[0]['cores']} cores")
    _log_axes(a, c)
    a.set(xlabel="concurrency (clients)", ylabel="cores", title="CPU used", ylim=(0, cpu[0]["cores"] * 1.1))
    a.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bars(groups: dict[str, dict[str, float]], path: str | Path, title: str, ylabel: str,
         log: bool = False) -> Path:
    """Grouped bars: ``groups[group][series] = value`` (e.g. model -> {batching on, batching off})."""
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    fig, a = plt.subplots(figsize=(min(12, max(6, 0.5 * len(names) * max(len(series), 1) + 2)), 4.5))
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        a.bar(xs, [groups[g].get(s, 0.0) for g in names], width, label=s)
    a.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    a.set(ylabel=ylabel, title=title)
    if log:
        a.set_yscale("log")
        a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
    a.grid(axis="y", alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
