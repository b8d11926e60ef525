"""The GPU path, ready to measure: parity with the CPU, batch invariance and a throughput sweep on one provider.

    python -m benchmarks.gpu_check --repo quickstart/model_repository --out gpu.json          # CUDA
    python -m benchmarks.gpu_check --repo quickstart/model_repository --provider cpu --quick  # the same checks on CPU

1. **Parity**: every operation of every model, served on ``--provider`` (CUDA with I/O binding, see
   server/sessions.py) against the CPU provider for the same seeds and inputs: the largest difference relative
   to the CPU's largest value, per model and operation (float32 kernels differ in their last bits; TF32 or a
   different reduction order shows as 1e-4..1e-3).
2. **Batch invariance**: the deterministic operations (Encode; LogLikelihood of the autoregressive models) of
   each row alone against the same row inside a batch of 64, on ``--provider``: 0 means the row's answer does
   not depend on its neighbours (on CUDA, padding calls to fixed sizes makes that so: ``pad_batches``).
3. **Throughput**: a closed-loop sweep (benchmarks/loadgen.py) of a server on ``--provider`` at 1/8/64 clients
   and 1/64 rows, requests/s and p50/p99.

Exits 2 without measuring when the provider is CUDA and ONNX Runtime has no CUDA provider here (it says so); CI
never needs a GPU. Prints a markdown report; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

OPERATIONS = ("sample", "log_likelihood", "encode", "decode")


def cuda_available() -> tuple[bool, str]:
    """(whether ONNX Runtime offers CUDA here, why not)."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (f"ONNX Runtime {ort.__version__} offers {', '.join(providers)} here, no "
                       "CUDAExecutionProvider (install onnxruntime-gpu on a machine with CUDA)")
    return True, ""


def engines(repo: Path, provider: str, models: list[str] | None) -> tuple[Any, Any]:
    from genserve.server.config import ServerConfig
    from genserve.server.local import LocalEngine

    def config(p: str) -> ServerConfig:
        return ServerConfig(repo=repo, port=0, metrics_port=0, provider=p, max_queue_delay_ms=0.0)

    return (LocalEngine(repo, models=models, config=config("cpu")),
            LocalEngine(repo, models=models, config=config(provider)))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)) if b.size else 0.0


def parity(cpu: Any, dev: Any, rows: int) -> list[dict[str, Any]]:
    """Largest relative difference per model and operation, ``dev`` against ``cpu``, same seeds and inputs."""
    out = []
    for status in cpu.models():
        if status.state != "READY":
            continue
        name, ops = status.name, set(status.operations)
        x = cpu.sample(name, rows, seed=0).x if "sample" in ops else None
        if x is None:  # a model without sampling: inputs in its domain
            spec = cpu.spec(name)
            x = np.zeros((rows, *spec.shape), np.float32)
        for op in OPERATIONS:
            if op not in ops:
                continue
            if op == "sample":
                a, b = dev.sample(name, rows, seed=0).x, cpu.sample(name, rows, seed=0).x
            elif op == "log_likelihood":
                a, b = dev.log_likelihood(name, x, seed=1).log_prob, cpu.log_likelihood(name, x, seed=1).log_prob
            elif op == "encode":
                a, b = dev.encode(name, x, seed=1).z, cpu.encode(name, x, seed=1).z
            else:
                z = cpu.encode(name, x, seed=1).z if "encode" in ops else None
                if z is None:
                    continue
                a, b = dev.decode(name, z, seed=1).x, cpu.decode(name, z, seed=1).x
            out.append({"model": name, "operation": op, "rows": rows, "max_rel_diff": relative(a, b)})
    return out


def invariance(dev: Any, rows: int) -> list[dict[str, Any]]:
    """Each row alone against the same row in a batch of ``rows``: largest absolute difference (0: invariant)."""
    out = []
    for status in dev.models():
        if status.state != "READY":
            continue
        name, ops = status.name, set(status.operations)
        if "encode" in ops:
            def run(x: np.ndarray, name: str = name) -> np.ndarray:
                return dev.encode(name, x).z
            op = "encode"
        elif "log_likelihood" in ops and status.family == "autoregressive":  # exact: no noise
            def run(x: np.ndarray, name: str = name) -> np.ndarray:
                return dev.log_likelihood(name, x, seed=0).log_prob
            op = "log_likelihood"
        else:
            continue
        x = dev.sample(name, rows, seed=3).x if "sample" in ops else np.zeros((rows, *dev.spec(name).shape))
        batch = run(x)
        alone = np.concatenate([run(x[i:i + 1]) for i in range(rows)])
        out.append({"model": name, "operation": op, "rows": rows,
                    "max_abs_diff": float(np.max(np.abs(np.asarray(batch, np.float64) - alone)))})
    return out


def throughput(repo: Path, provider: str, model: str, operation: str, clients: list[int],
               rows: list[int], window_s: float) -> list[dict[str, Any]]:
    from benchmarks.loadgen import LoadGenerator, LoadSpec, SweepSettings
    from benchmarks.serverproc import ServerProcess

    out = []
    settings = SweepSettings(concurrency=tuple(clients), warmup_s=1.0, window_s=window_s, stable_windows=2,
                             max_windows=4)
    with ServerProcess(repo, flags={"--provider": provider}) as server:
        for r in rows:
            with LoadGenerator(LoadSpec(server.target, model, operation, rows=r), 2, server.pid) as gen:
                for c in clients:
                    res = gen.measure(c, settings, server.metrics_url)
                    out.append({"rows": r, "clients": c, "rps": res["throughput_rps"],
                                "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"],
                                "errors": len(res["errors"])})
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"provider {report['provider']} vs cpu; {m.get('cpu_model')}, {m.get('cores')} cores, load "
             f"{m.get('loadavg', ('?',))[0]}", "", "| model | operation | max rel. diff |",
             "| --- | --- | --- |"]
    lines += [f"| {p['model']} | {p['operation']} | {p['max_rel_diff']:.2e} |" for p in report["parity"]]
    lines += ["", "| model | operation | rows | alone vs batched, max abs. diff |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['model']} | {p['operation']} | {p['rows']} | {p['max_abs_diff']:.2e} |"
              for p in report["invariance"]]
    if report["throughput"]:
        lines += ["", f"{report['model']} {report['operation']}:", "", "| rows | clients | req/s | p50 ms | p99 ms |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {t['rows']} | {t['clients']} | {t['rps']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} |"
                  for t in report["throughput"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path)
    p.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="*", help="models to check (default: every model)")
    p.add_argument("--rows", type=int, default=64, help="rows of the parity and invariance batches (default 64)")
    p.add_argument("--model", default="digits-realnvp", help="model of the throughput sweep")
    p.add_argument("--operation", default="encode", help="operation of the throughput sweep")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--sweep-rows", default="1,64")
    p.add_argument("--window-s", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="parity and invariance only, no throughput sweep")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.provider == "cuda":
        ok, why = cuda_available()
        if not ok:
            print(f"gpu_check: nothing measured: {why}", file=sys.stderr)
            return 2
    from benchmarks import procstat

    cpu, dev = engines(args.repo, args.provider, args.models)
    with cpu, dev:
        report: dict[str, Any] = {"provider": args.provider, "machine": procstat.machine_info(),
                                  "parity": parity(cpu, dev, args.rows), "invariance": invariance(dev, args.rows),
                                  "model": args.model, "operation": args.operation, "throughput": []}
    if not args.quick:
        report["throughput"] = throughput(args.repo, args.provider, args.model, args.operation,
                                          [int(c) for c in args.clients.split(",")],
                                          [int(r) for r in args.sweep_rows.split(",")], args.window_s)
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
