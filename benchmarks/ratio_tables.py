"""Markdown tables and PNG figures of the ratio results (benchmarks/ratios.py), drawn from their JSON alone.

    python -m benchmarks.ratio_tables docs/benchmarks      # redraw every ratio-*.json found there, print tables
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import plots


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _per_cpu(s: dict) -> float | None:
    """Requests per CPU-second of the server process."""
    return s["throughput_rps"] / s["server_cores"] if s.get("server_cores") else None


def _case_name(c: dict) -> str:
    """The model, with K for the VAE (its importance samples: graph rows per request row)."""
    return f"{c['model']} (K={c['importance_samples'] or 'default'})" if "vae" in c["model"] else c["model"]


def batching(out: dict, out_dir: str | Path) -> str:
    """Ratio a: requests/s and p99 with batching on and off, per case."""
    groups = {_case_name(c):
              {"batching on (64)": c["on"]["throughput_rps"], "batching off (1)": c["off"]["throughput_rps"]}
              for c in out["cases"]}
    clients = out["cases"][0]["concurrency"] if out["cases"] else "?"
    plots.bars(groups, Path(out_dir) / "batching.png", f"{clients} clients, 1-row LogLikelihood: requests/s",
               "requests/s", log=True)
    lines = ["| model | batching | req/s | p50 ms | p99 ms | rows/call | server cores | req per server CPU-s "
             "| load 1m | stable | limited by |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in out["cases"]:
        name = _case_name(c)
        for label in ("on", "off"):
            s = c[label]
            lines.append(f"| {name} | {label} | {s['throughput_rps']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['rows_per_call'] or 0:.1f} | {_fmt(s['server_cores'], '.2f')} | "
                         f"{_fmt(_per_cpu(s), '.0f')} | {s['loadavg_1m']:.1f} | "
                         f"{'yes' if s['stable'] else 'no'} | {s['limited_by']} |")
        on, off = _per_cpu(c["on"]), _per_cpu(c["off"])
        eff = on / off if on and off else None
        lines.append(f"| {name} | **on / off** | **{_fmt(c['throughput_ratio'], '.1f', 'x')}** | | "
                     f"**{_fmt(c['p99_ratio_on_over_off'], '.2f')}** | | | **{_fmt(eff, '.1f', 'x')}** | | | |")
    return "\n".join(lines)


def _ceiling_name(c: dict) -> str:
    rows = c.get("request_rows", 1)
    return f"{c['model']}, {rows}-row requests"


def ceiling(out: dict, out_dir: str | Path) -> str:
    """Ratio b: the server's rows/s at saturation over the in-process best, by wall time and per CPU-second."""
    groups: dict[str, dict[str, float]] = {}
    for c in out["cases"]:
        g = groups.setdefault(c["model"], {f"in-process batch {b}": v["rows_s"] for b, v in c["in_process"].items()})
        g[f"server, {c.get('request_rows', 1)}-row requests"] = c["server_rows_s"]
    plots.bars(groups, Path(out_dir) / "ceiling.png", "LogLikelihood rows/s: server vs ORT in-process",
               "rows/s", log=True)
    lines = ["| model, request size | server rows/s (clients) | in-process rows/s by batch | best | fraction | server "
             "rows per CPU-s | in-process rows per CPU-s (batch) | fraction per CPU-s | limited by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in out["cases"]:
        per = ", ".join(f"{b}: {v['rows_s']:.0f}" for b, v in c["in_process"].items())
        lines.append(f"| {_ceiling_name(c)} | {c['server_rows_s']:.0f} ({c['server']['concurrency']}) | {per} | "
                     f"{c['ceiling_rows_s']:.0f} (batch {c['best_batch']}) | **{c['fraction']:.2f}** | "
                     f"{_fmt(c['server_rows_per_cpu_s'], '.0f')} | {c['ceiling_rows_per_cpu_s']:.0f} "
                     f"({c['best_cpu_batch']}) | **{_fmt(c['fraction_per_cpu_s'], '.2f')}** | "
                     f"{c['server']['limited_by']} |")
    return "\n".join(lines)


def ort_torch(out: dict, out_dir: str | Path) -> str:
    """Ratio c: per graph and batch, PyTorch eager over ONNX Runtime (the figure plots CPU time)."""
    rows = out["rows"]
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(f"{r['model'].removeprefix('digits-')}.{r['graph']}", {})[f"batch {r['batch']}"] = \
            r["speedup_cpu"]
    plots.bars(groups, Path(out_dir) / "ort_vs_torch.png",
               "PyTorch eager CPU time / ONNX Runtime CPU time per call (1 thread each)", "ORT speedup (x)",
               log=True)
    lines = ["| graph | batch | PyTorch eager µs | ONNX Runtime µs | ORT speedup | PyTorch CPU µs | ORT CPU µs "
             "| ORT speedup (CPU time) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']}.{r['graph']} | {r['batch']} | {r['torch_us']:.0f} | {r['ort_us']:.0f} | "
              f"{r['speedup']:.2f}x | {r['torch_cpu_us']:.0f} | {r['ort_cpu_us']:.0f} | **{r['speedup_cpu']:.2f}x** |"
              for r in rows]
    return "\n".join(lines)


def sampling(out: dict, out_dir: str | Path) -> str:
    """Ratio d: arrnn carried state vs full prefix; samples/s of every model in-process and served."""
    per_model = out["models"]
    groups = {n.removeprefix("digits-"): {"in-process": v["in_process_samples_s"],
                                          **({"server": v["server_samples_s"]} if "server_samples_s" in v else {})}
              for n, v in per_model.items()}
    plots.bars(groups, Path(out_dir) / "samples_per_s.png", "samples/s (64 samples per call or request)",
               "samples/s", log=True)
    a = out["arrnn"]
    lines = [f"arrnn, 64 samples of {a['steps']} steps: carried state {a['step_s'] * 1e3:.1f} ms, full prefix "
             f"{a['prefix_s'] * 1e3:.1f} ms: **{a['speedup']:.1f}x** (CPU time: {a['speedup_cpu']:.1f}x; identical "
             f"samples: {a['identical_samples']})",
             "", "| model | in-process samples/s (n=64) | per CPU-s | server samples/s (n=64, clients) | per server "
             "CPU-s | server p50 ms | load 1m |", "|---|---|---|---|---|---|---|"]
    for n, v in per_model.items():
        srv = f"{v['server_samples_s']:.0f} ({v['server_clients']})" if "server_samples_s" in v else "-"
        srv_cpu = _fmt(v.get("server_samples_per_cpu_s"), ".0f")
        p50 = _fmt(v.get("server_p50_ms"), ".1f")
        load = _fmt(v.get("loadavg_1m"), ".1f")
        lines.append(f"| {n} | {v['in_process_samples_s']:.0f} | {v['in_process_samples_per_cpu_s']:.0f} | {srv} "
                     f"| {srv_cpu} | {p50} | {load} |")
    return "\n".join(lines)


RENDER = {"batching": batching, "ceiling": ceiling, "ort-torch": ort_torch, "sampling": sampling}


def render(result: dict, out_dir: str | Path) -> str:
    """Draw the result's figure into ``out_dir`` and return its Markdown table."""
    return RENDER[result["ratio"]](result, out_dir)


def main(argv: list[str] | None = None) -> int:
    out_dir = Path((argv if argv is not None else sys.argv[1:] or ["docs/benchmarks"])[0])
    for path in sorted(out_dir.glob("ratio-*.json")):
        result = json.loads(path.read_text())
        print(f"{path}: `{result.get('command', '')}`, load {result['machine']['loadavg']} -> "
              f"{result.get('loadavg_end')}\n")
        print(render(result, out_dir) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
