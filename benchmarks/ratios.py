"""`python -m benchmarks.ratios`: the four ratios of BENCHMARKS.md, each measured by one command on one machine.

    python -m benchmarks.ratios batching --repo /tmp/bench/repo        # a. dynamic batching on vs off
    python -m benchmarks.ratios ceiling  --repo /tmp/bench/repo        # b. server at saturation vs in-process
    python -m benchmarks.ratios ort-torch --repo /tmp/bench/repo --checkpoints /tmp/bench   # c. ORT vs eager
    python -m benchmarks.ratios sampling --repo /tmp/bench/repo        # d. arrnn step vs prefix; samples/s

Each writes ``--out-dir``/ratio-<name>.json, draws its PNG and prints its Markdown table (both redrawn from the
JSON by ``python -m benchmarks.ratio_tables DIR``). The in-process figures run
ONNX Runtime with the server's thread settings (1 intra-op, 1 inter-op thread, no spinning) and PyTorch with
``torch.set_num_threads(1)``. Timings are medians of repeated calls after warm-up calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import procstat, ratio_tables
from benchmarks.loadgen import SweepSettings
from benchmarks.run import run_sweep

FLOW, VAE, ARRNN = "digits-realnvp", "digits-vae", "digits-arrnn"


# ---- helpers -------------------------------------------------------------------------------------------------
def timeit(fn: Callable[[], Any], budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 5000,
           warmup: int = 3) -> dict:
    """Median and best seconds per call of ``fn`` over as many calls as fit in ``budget_s`` (within bounds),
    after ``warmup`` calls and at least a fifth of the budget of warm-up (lazy initialisation, caches)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start < budget_s / 5 and done < max_reps):
        fn()
        done += 1
    times: list[float] = []
    start, cpu0 = time.perf_counter(), time.process_time()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # CPU seconds per call (this process, all threads): a figure that other tenants' load does not inflate.
    cpu = (time.process_time() - cpu0) / len(times)
    return {"median_s": statistics.median(times), "best_s": min(times), "reps": len(times), "cpu_s": cpu,
            "cpu_share": cpu * len(times) / (time.perf_counter() - start)}


def load_program(repo: Path, name: str) -> tuple[Any, Any, dict[str, Path]]:
    """(program, manifest, graph files) of the default (highest) version of model ``name`` in ``repo``."""
    from genserve.core.manifest import read_manifest
    from genserve.server.programs import program_from_manifest

    version = max(int(p.name) for p in (repo / name).iterdir() if p.is_dir() and p.name.isdigit())
    folder = repo / name / str(version)
    manifest = read_manifest(folder / "manifest.json")
    program = program_from_manifest(manifest)
    return program, manifest, {g.name: folder / g.file for g in manifest.graphs}


PROVIDER = ["cpu"]
"""The ONNX Runtime provider of every run (``--provider``; cpu unless a GPU table is being measured)."""


def direct_runner(files: dict[str, Path]) -> Any:
    """ONNX Runtime called directly with the server's defaults: 1 intra-op and 1 inter-op thread."""
    from genserve.server.sessions import DirectRunner, SessionOptions

    opts = SessionOptions(provider=PROVIDER[0], intra_op_threads=1, inter_op_threads=1)
    return DirectRunner.from_files(files, opts)


def server_sample_rows(repo: Path, name: str, n: int) -> np.ndarray:
    """n data rows for model ``name``: its own samples, drawn in-process (valid data of its domain)."""
    from genserve.core.noise import Noise

    program, _, files = load_program(repo, name)
    return asyncio.run(program.sample(direct_runner(files), n, Noise(1))).x


def header(kind: str) -> dict:
    return {"ratio": kind, "machine": procstat.machine_info(), "started_unix": time.time(), "provider": PROVIDER[0],
            "command": "python -m benchmarks.ratios " + " ".join(sys.argv[1:])}


def level_summary(level: dict) -> dict:
    """The figures of one load-generator level that the ratio tables quote."""
    s = level["server"]
    return {"throughput_rps": level["throughput_rps"], "throughput_rows_s": level["throughput_rows_s"],
            "p50_ms": level["latency_ms"]["p50"], "p99_ms": level["latency_ms"]["p99"],
            "stable": level["stable"], "errors": level["errors"], "rows_per_call": s.get("rows_per_call"),
            "queue_ms": s.get("queue_s", 0) * 1e3, "compute_ms": s.get("compute_s", 0) * 1e3,
            "server_cores": level["cpu"]["processes_cores"].get("server"),
            "loadgen_cores": sum(v or 0 for k, v in level["cpu"]["processes_cores"].items()
                                 if k.startswith("loadgen")),
            "machine_busy_cores": level["cpu"]["machine_busy_cores"], "loadavg_1m": level["loadavg"][0],
            "rps_per_server_cpu_s": (level["throughput_rps"] / level["cpu"]["processes_cores"]["server"]
                                     if level["cpu"]["processes_cores"].get("server") else None),
            "limited_by": level["limited_by"]}


def sweep_settings(args: argparse.Namespace, concurrency: tuple[int, ...]) -> SweepSettings:
    return SweepSettings(concurrency=concurrency, warmup_s=args.warmup_s, window_s=args.window_s,
                         stable_windows=args.stable_windows, max_windows=args.max_windows)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- a. dynamic batching on vs off ---------------------------------------------------------------------------
def batching(args: argparse.Namespace) -> dict:
    """64 clients, 1-row LogLikelihood, max_batch_size 64 vs 1: the flow, the VAE with K = 1 (one graph row
    per request) and the VAE with its default K (K graph rows per request, all single-row calls when off)."""
    out = header("batching")
    # With the default K and batching off, the 64 requests advance in lockstep through K single-row calls
    # each (the batcher serves them round robin), so they finish in bursts: longer windows smooth them out.
    slow = argparse.Namespace(**{**vars(args), "window_s": max(args.window_s, args.slow_window_s),
                                 "warmup_s": max(args.warmup_s, args.slow_window_s / 2)})
    cases = [(FLOW, None, args), (VAE, 1, args), (VAE, None, slow)]
    out["cases"] = []
    for model, k, timing in cases:
        case = {"model": model, "importance_samples": k, "concurrency": args.clients,
                "window_s": timing.window_s, "warmup_s": timing.warmup_s}
        for label, mbs in (("on", 64), ("off", 1)):
            log(f"batching {label}: {model} K={k or 'default'}")
            r = run_sweep({"model": model, "operation": "log_likelihood", "rows": 1, "importance_samples": k},
                          sweep_settings(timing, (args.clients,)), args.processes, repo=str(args.repo),
                          serving={"max_batch_size": mbs, "max_queue_delay_ms": args.delay_ms},
                          flags={"--threads": 1, "--provider": PROVIDER[0]}, log=log)
            case[label] = level_summary(r["levels"][0])
        off_rps, off_p99 = case["off"]["throughput_rps"], case["off"]["p99_ms"]
        case["throughput_ratio"] = case["on"]["throughput_rps"] / off_rps if off_rps > 0 else None
        case["p99_ratio_on_over_off"] = case["on"]["p99_ms"] / off_p99 if off_p99 > 0 else None
        on_eff, off_eff = case["on"]["rps_per_server_cpu_s"], case["off"]["rps_per_server_cpu_s"]
        case["efficiency_ratio"] = on_eff / off_eff if on_eff and off_eff else None  # requests per server CPU-s
        out["cases"].append(case)
    return out


# ---- b. server at saturation vs in-process ceiling -----------------------------------------------------------
CEILING_REQUESTS = {FLOW: ((1, (32, 64)), (64, (4, 16))), VAE: ((1, (32, 64)), (4, (4, 16)))}
"""Per model: (rows per request, concurrency levels). 1-row requests are online scoring, bound by the cost of
a request; the larger ones a pipeline scoring records in batches, about 1000 graph rows per request (64 rows
x 16 dequantisation draws for the flow, 4 rows x K = 500 for the VAE), bound by the graphs: a few clients
keep the graphs busy."""


def ceiling(args: argparse.Namespace) -> dict:
    """Server rows/s at saturation (LogLikelihood, max over the levels) over the in-process best, for each
    request size of CEILING_REQUESTS."""
    from genserve.core.noise import Noise

    out = header("ceiling")
    out["server_max_batch_size"] = args.server_max_batch_size
    out["cases"] = []
    for model in (FLOW, VAE):
        log(f"ceiling: in-process {model}")
        program, _, files = load_program(args.repo, model)
        runner = direct_runner(files)
        pool = server_sample_rows(args.repo, model, max(args.batches))
        loop = asyncio.new_event_loop()
        inproc = {}
        for b in args.batches:
            x = pool[:b]
            def score(x: np.ndarray = x, p: Any = program, r: Any = runner, lp: Any = loop) -> None:
                lp.run_until_complete(p.log_likelihood(r, x, Noise(3)))

            t = timeit(score, budget_s=args.budget_s)
            inproc[b] = {**t, "rows_s": b / t["median_s"], "rows_per_cpu_s": b / t["cpu_s"]}
        loop.close()
        best_b = max(inproc, key=lambda b: inproc[b]["rows_s"])
        best_cpu_b = max(inproc, key=lambda b: inproc[b]["rows_per_cpu_s"])
        for rows, levels in CEILING_REQUESTS[model]:
            log(f"ceiling: server {model}, {rows}-row requests")
            r = run_sweep({"model": model, "operation": "log_likelihood", "rows": rows},
                          sweep_settings(args, levels), args.processes, repo=str(args.repo),
                          serving={"max_batch_size": args.server_max_batch_size},
                          flags={"--threads": 1, "--provider": PROVIDER[0]}, log=log)
            best_level = max(r["levels"], key=lambda lv: lv["throughput_rows_s"])
            server_rows = best_level["throughput_rows_s"]
            server_cores = best_level["cpu"]["processes_cores"].get("server") or 0.0
            server_per_cpu = server_rows / server_cores if server_cores else None
            out["cases"].append({
                "model": model, "request_rows": rows,
                "server": {"concurrency": best_level["concurrency"], **level_summary(best_level)},
                "in_process": {str(b): v for b, v in inproc.items()}, "best_batch": best_b,
                "ceiling_rows_s": inproc[best_b]["rows_s"], "server_rows_s": server_rows,
                "fraction": server_rows / inproc[best_b]["rows_s"],
                "fraction_vs_batch64": server_rows / inproc[64]["rows_s"] if 64 in inproc else None,
                # The same comparison per CPU-second (server process vs this process), which contention from
                # other tenants of the machine does not distort: rows each spends one second of CPU on.
                "server_rows_per_cpu_s": server_per_cpu, "best_cpu_batch": best_cpu_b,
                "ceiling_rows_per_cpu_s": inproc[best_cpu_b]["rows_per_cpu_s"],
                "fraction_per_cpu_s": (server_per_cpu / inproc[best_cpu_b]["rows_per_cpu_s"]
                                       if server_per_cpu else None),
            })
    return out


# ---- c. ONNX Runtime vs PyTorch eager ------------------------------------------------------------------------
def ort_torch(args: argparse.Namespace) -> dict:
    """Every exported graph of every checkpoint in --checkpoints, at batch 1 and 64, ORT vs PyTorch eager."""
    import torch

    from genserve.export.contract import bind
    from genserve.export.repository import default_name
    from genserve.server.sessions import SessionOptions, make_session
    from genserve.training.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; eager calls here use one thread anyway
        pass
    out = header("ort-torch")
    out["torch_threads"] = torch.get_num_threads()
    rows = []
    out["skipped"] = {}
    for ckpt in sorted(Path(args.checkpoints).glob("*.pt")):
        try:
            model, _ = load_checkpoint(ckpt)
        except ValueError as e:  # e.g. a checkpoint older than its family's current code
            out["skipped"][str(ckpt)] = str(e)
            log(f"skip {ckpt}: {e}")
            continue
        name = default_name(model)
        if not (args.repo / name).is_dir():
            log(f"skip {ckpt}: {name} is not in {args.repo}")
            continue
        _, manifest, files = load_program(args.repo, name)
        for gname, g in bind(model, model.family, model.spec).graphs.items():
            session = make_session(files[gname], SessionOptions(provider=PROVIDER[0]))
            ort_names = [i.name for i in session.get_inputs()]
            for b in (1, 64):
                feeds = {k: np.take(v.detach().numpy(), np.arange(b) % v.shape[0], axis=0).astype(np.float32)
                         for k, v in g.inputs.items()}
                tensors = [torch.from_numpy(feeds[k]) for k in g.inputs]
                ort_feeds = {k: feeds[k] for k in ort_names}  # an exporter may drop an unused input

                def eager(tensors: list = tensors, module: Any = g.module) -> None:
                    with torch.inference_mode():
                        module(*tensors)

                t_torch = timeit(eager, budget_s=args.budget_s)
                t_ort = timeit(lambda f=ort_feeds, s=session: s.run(None, f), budget_s=args.budget_s)
                rows.append({"model": name, "graph": gname, "batch": b, "torch_us": t_torch["median_s"] * 1e6,
                             "ort_us": t_ort["median_s"] * 1e6,
                             "speedup": t_torch["median_s"] / t_ort["median_s"],
                             "torch_cpu_us": t_torch["cpu_s"] * 1e6, "ort_cpu_us": t_ort["cpu_s"] * 1e6,
                             "speedup_cpu": t_torch["cpu_s"] / t_ort["cpu_s"]})
                log(f"{name}.{gname} batch {b}: torch {rows[-1]['torch_us']:.0f} us, ORT {rows[-1]['ort_us']:.0f}"
                    f" us, {rows[-1]['speedup']:.2f}x")
    out["rows"] = rows
    out["loadavg_after"] = procstat.loadavg()
    return out


# ---- d. autoregressive sampling and samples/s ----------------------------------------------------------------
def sampling(args: argparse.Namespace) -> dict:
    """arrnn: 64 samples by carried-state steps vs full-prefix recomputation; samples/s of every model."""
    from genserve.core.noise import Noise

    out = header("sampling")
    program, _, files = load_program(args.repo, ARRNN)
    runner = direct_runner(files)
    loop = asyncio.new_event_loop()

    def draw(recompute: bool) -> np.ndarray:
        return loop.run_until_complete(program.sample(runner, 64, Noise(7), recompute=recompute)).x

    same = bool(np.array_equal(draw(False), draw(True)))
    step = timeit(lambda: draw(False), budget_s=args.budget_s, min_reps=3, warmup=1)
    prefix = timeit(lambda: draw(True), budget_s=args.budget_s, min_reps=3, warmup=1)
    out["arrnn"] = {"n": 64, "steps": int(program.spec.dim), "step_s": step["median_s"], "prefix_s": prefix["median_s"],
                    "speedup": prefix["median_s"] / step["median_s"], "identical_samples": same,
                    "step_cpu_s": step["cpu_s"], "prefix_cpu_s": prefix["cpu_s"],
                    "speedup_cpu": prefix["cpu_s"] / step["cpu_s"]}
    log(f"arrnn 64 samples: step {step['median_s'] * 1e3:.1f} ms, prefix {prefix['median_s'] * 1e3:.1f} ms, "
        f"{out['arrnn']['speedup']:.1f}x, identical {same}")

    models = sorted(p.name for p in args.repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_model = {}
    for name in models:
        prog, manifest, fs = load_program(args.repo, name)
        if "sample" not in prog.operations:
            continue
        run = direct_runner(fs)
        t = timeit(lambda p=prog, r=run: loop.run_until_complete(p.sample(r, 64, Noise(7))),
                   budget_s=args.budget_s, min_reps=3, warmup=1)
        per_model[name] = {"in_process_samples_s": 64 / t["median_s"], "in_process_ms_per_64": t["median_s"] * 1e3,
                           "in_process_samples_per_cpu_s": 64 / t["cpu_s"]}
        log(f"{name}: in-process {per_model[name]['in_process_samples_s']:.0f} samples/s")
    loop.close()
    if not args.no_server:
        for name in per_model:
            log(f"sampling through the server: {name}")
            r = run_sweep({"model": name, "operation": "sample", "rows": 64}, sweep_settings(args, (args.clients,)),
                          args.processes, repo=str(args.repo), serving={"max_batch_size": 64},
                          flags={"--threads": 1, "--provider": PROVIDER[0]}, log=log)
            lv = r["levels"][0]
            cores = lv["cpu"]["processes_cores"].get("server")
            per_model[name].update({"server_samples_per_cpu_s": lv["throughput_rows_s"] / cores if cores else None})
            per_model[name].update({"server_samples_s": lv["throughput_rows_s"], "server_clients": args.clients,
                                    "server_p50_ms": lv["latency_ms"]["p50"], "server_limited_by": lv["limited_by"],
                                    "loadavg_1m": lv["loadavg"][0]})
    out["models"] = per_model
    return out


COMMANDS = {"batching": batching, "ceiling": ceiling, "ort-torch": ort_torch, "sampling": sampling}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ratios", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ratio", choices=list(COMMANDS))
    p.add_argument("--repo", type=Path, required=True, help="model repository (digits-realnvp, digits-vae, ...)")
    p.add_argument("--checkpoints", type=Path, help="folder of `genserve train` checkpoints (ort-torch)")
    p.add_argument("--out-dir", default="docs/benchmarks", help="JSON and PNG go here")
    p.add_argument("--processes", type=int, default=2, help="load-generator processes")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (batching: 64; sampling: 64)")
    p.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms with batching on")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--slow-window-s", type=float, default=20.0,
                   help="batching: window of the VAE at its default K (bursty when off)")
    p.add_argument("--stable-windows", type=int, default=3)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=1.5, help="seconds of repeated calls per in-process timing")
    p.add_argument("--batches", default="1,4,16,64,256", help="in-process batch sizes (ceiling)")
    p.add_argument("--server-max-batch-size", type=int, default=512,
                   help="ceiling: the server's max_batch_size (its best setting, as in-process takes its best batch)")
    p.add_argument("--no-server", action="store_true", help="sampling: in-process figures only")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime provider of the server and the in-process runs (cuda: the GPU table)")
    args = p.parse_args(argv)
    PROVIDER[0] = args.provider
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.ratio == "ort-torch" and args.checkpoints is None:
        p.error("ort-torch needs --checkpoints")
    result = COMMANDS[args.ratio](args)
    result["loadavg_end"] = procstat.loadavg()
    path = Path(args.out_dir) / f"ratio-{args.ratio}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(ratio_tables.render(result, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
