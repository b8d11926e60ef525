"""`genserve models | info | load | unload | sample | score | encode | decode`: the command line against a server.

Only argparse is imported here; the client (grpc, numpy) is imported when a subcommand runs, so `genserve
--help` stays fast and works in any install.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

CONNECTION = """server connection:
  --server defaults to $GENSERVE_SERVER, else localhost:8500; a comma-separated list of HOST:PORT (or a
  dns:///NAME:PORT target) spreads requests round-robin. The token defaults to $GENSERVE_TOKEN. Calls that
  find the server down are retried by gRPC with backoff for a few seconds."""

EPILOGS = {
    "health": """examples:
  genserve health                              # SERVING (exit 0) or NOT_SERVING (exit 1)
  genserve health digits-vae --server 10.0.0.5:8500
""",
    "models": """examples:
  genserve models
  genserve models --server gpu-box:8500 --json
""",
    "load": """examples:
  genserve load digits-vae          # load or reload it (server started with --model-control-mode explicit)
""",
    "unload": """examples:
  genserve unload digits-vae        # requests in flight on it finish first
""",
    "info": """examples:
  genserve info digits-vae
  genserve info digits-vae --version 2 --json > info.json
""",
    "sample": """examples:
  genserve sample digits-vae -n 64 --seed 1 --out samples.npy          # also writes samples.png (8x8 images)
  genserve sample digits-arcnn -n 16 --temperature 0.8 --out ar.npy --png ar-grid.png
  genserve sample moons-realnvp -n 100000 --out moons.npy               # large n is streamed in chunks
  genserve sample digits-ebm -n 32 --langevin-steps 200 --langevin-step-size 0.01 --out ebm.npy
  genserve sample digits-vae -n 64 --latents z.npy --out x.npy         # also save the latent codes

The .npy holds (n, *shape) float32 in raw data units (digits: grey levels 0..16). Without --seed a seed is
drawn and printed, so every run can be repeated exactly.
""",
    "score": """examples:
  genserve score digits-vae test.npy --out scores.csv
  genserve score wine-flow records.parquet --id-column id --below-percentile 5 --out scored.parquet
  genserve score digits-arcnn images.npz --score-kind complexity_ratio --below-percentile 1 --out flags.csv
  genserve score digits-arcnn images.npy --explain worst.png --explain-rows 16 --out scores.csv
  genserve score moons-realnvp points.csv --out scores.csv --threshold -6.5          # flag log p < -6.5 nats
  genserve score digits-arcnn images.npz --key x --out scores.csv --quantile 0.05     # lowest 5% OF THIS FILE
  genserve score wine-flow records.parquet --id-column id --columns a,b,c > scores.csv   # ids kept, CSV on stdout
  genserve score digits-realnvp big.npy --out scores.csv --seed 1 --engine ray --repo /shared/models \
      --address ray://head:10001 --concurrency 8       # Ray Data actors, no server: the same scores

Input: .npy (memory-mapped), .npz, .csv (one example per line, optional header) or .parquet, with rows of
the model's shape or flattened (64 values for 8x8 digits). Output: --out FILE.csv or FILE.parquet (the suffix
chooses), or CSV on stdout (no --out, or -). One row per input row, in input order:
  [id columns,] row, log_prob_nats, bits_per_dim, [score kinds,] [percentile[, percentile_<kind>...],]
  [flag | outlier]
bits_per_dim is empty (null) for energy models (unnormalized scores). Rows stream to the server in chunks
with several in flight and the table is written as the answers come: a file of any size is scored in
constant memory. The file appears at --out only when complete (a failed run leaves none); a progress bar is
drawn on a terminal.

Flags. --below-percentile P flags rows whose percentile is below P, a FIXED threshold: the percentile
places each row's score among held-out in-distribution data scored when the model was exported (its
calibration; `genserve info NAME --json` shows it), so the flag rate follows the data. --quantile Q is
relative to the batch being scored: it always flags a fraction Q of the file, whatever the data (it keeps
the scores, 8 bytes a row, and writes the table twice). --threshold flags log p below a fixed value.

Score kinds (--score-kind, repeatable; `genserve info NAME` lists what a model serves) are computed by the
server beside log_prob, e.g. a likelihood ratio to a simple reference model that corrects the raw
likelihood's preference for simple inputs. The first kind is the one `percentile`, `flag` and --explain go
by. A per-batch kind (a typicality test) is computed over each chunk of --chunk-size rows.

--explain OUT.png (image models) asks for the per-dimension terms of -log p and draws the --explain-rows
most anomalous rows (lowest percentile, else lowest score) beside their heat maps. Families whose
likelihood has no exact per-dimension terms are refused by the server, saying why.

--engine ray scores the file without a server, in Ray Data actors that run the model of the repository
--repo in-process (pip install 'genserve[ray]'); the file and the repository must be at the same path on
every Ray worker. With the same --seed and --chunk-size the table is the server path's, bit for bit (per-batch
score kinds and --explain need a server).
""",
    "encode": """examples:
  genserve encode digits-vae images.npy --out z.npy                 # posterior means E[z|x]
  genserve encode digits-vae images.npy --out z.npy --sample --seed 3   # draws z ~ q(z|x)
""",
    "decode": """examples:
  genserve decode digits-vae z.npy --out x.npy --png x.png
  genserve decode digits-gan z.npy --out x.npy
""",
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _connection() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server connection")
    g.add_argument("--server", metavar="HOST:PORT",
                   help="server address (default $GENSERVE_SERVER or localhost:8500); a comma list balances")
    g.add_argument("--token",
                   help="bearer token, sent as 'authorization: Bearer TOKEN' (default $GENSERVE_TOKEN)")
    g.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", metavar="PEM", help="root certificates to trust (implies TLS)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    g.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="deadline of each call in seconds (default 30; streams have none)")
    return common


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = _connection()

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           epilog=EPILOGS[name] + "\n" + CONNECTION, formatter_class=_formatter)
        p.set_defaults(handler=globals()[f"run_{name}"])
        return p

    p = command("health", "check a server's (or one model's) gRPC health; exit 0 when SERVING")
    p.add_argument("model", nargs="?", help="model name (default: the whole server)")

    p = command("models", "list the models a running server has")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for name, verb in (("load", "load or reload a model of the server's repository (explicit model control)"),
                       ("unload", "unload a model (explicit model control)")):
        p = command(name, verb)
        p.add_argument("model", help="model name: its folder in the server's repository")

    p = command("info", "describe one model version: data, operations, likelihood, parameters, serving")
    p.add_argument("model", help="model name, as `genserve models` lists it")
    p.add_argument("--version", type=int, default=0, help="model version (default 0: the highest)")
    p.add_argument("--json", action="store_true", help="print everything, the manifest included, as JSON")

    p = command("sample", "draw samples from a model; write .npy (and a PNG grid for images)")
    p.add_argument("model", help="model name")
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    p.add_argument("--temperature", type=float, help="sampling temperature > 0 (default: the model's)")
    p.add_argument("--langevin-steps", type=int, help="energy models: Langevin steps")
    p.add_argument("--langevin-step-size", type=float, help="energy models: Langevin step size")
    p.add_argument("--out", default="samples.npy", help="samples .npy to write (default samples.npy)")
    p.add_argument("--png", help="PNG grid to write for image data (default: --out with .png)")
    p.add_argument("--no-png", action="store_true", help="write no PNG grid")
    p.add_argument("--latents", metavar="PATH", help="also write the latent codes to this .npy")
    p.add_argument("--version", type=int, default=0, help="model version (default 0: the highest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("score", "score every row of a file by log-likelihood (and score kinds): a table, a line per row")
    p.add_argument("model", help="model name")
    p.add_argument("input", help=".npy, .npz, .csv or .parquet file of examples")
    p.add_argument("--out", help="table to write: FILE.csv or FILE.parquet (default, or -: CSV on stdout)")
    p.add_argument("--columns", help="CSV/Parquet: comma-separated columns that make an example (default: all but "
                   "the id columns)")
    p.add_argument("--id-column", action="append", default=[], metavar="NAME",
                   help="CSV/Parquet: a column to keep beside the scores, e.g. a record id (repeatable)")
    p.add_argument("--score-kind", action="append", metavar="KIND",
                   help="a score to write beside log p, as the model serves it (repeatable; default log_prob); "
                        "the first decides percentile, flag and --explain")
    flag = p.add_mutually_exclusive_group()
    flag.add_argument("--below-percentile", type=float, metavar="P",
                      help="flag rows whose percentile among the model's calibration data (fixed at export) is "
                           "below P, 0 < P < 100")
    flag.add_argument("--threshold", type=float, metavar="NATS", help="flag rows whose log p is below this")
    flag.add_argument("--quantile", type=float, metavar="Q",
                      help="flag rows whose log p is below this quantile of THIS BATCH's scores, 0 < Q < 1 "
                           "(a constant flag rate; for a fixed threshold use --below-percentile)")
    p.add_argument("--explain", metavar="PNG",
                   help="image models: draw the most anomalous rows beside their per-pixel -log p heat maps")
    p.add_argument("--explain-rows", type=int, default=16, metavar="N",
                   help="rows drawn by --explain (default 16)")
    p.add_argument("--key", help=".npz: the array to read (default x, or the only one)")
    p.add_argument("--chunk-size", type=int, default=4096, metavar="N",
                   help="rows per streamed chunk (default 4096)")
    p.add_argument("--in-flight", type=int, default=4, metavar="N",
                   help="chunks sent ahead of their answers (default 4)")
    p.add_argument("--seed", type=int, help="seed of dequantisation / importance noise (default: drawn)")
    p.add_argument("--importance-samples", type=int, metavar="K", help="VAE: importance samples K per row")
    p.add_argument("--version", type=int, default=0, help="model version (default 0: the highest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("engine (--engine ray: Ray Data actors instead of a server)")
    g.add_argument("--engine", choices=("grpc", "ray"), default="grpc",
                   help="grpc: through a server (default); ray: Ray Data actors running the model in-process")
    g.add_argument("--repo", metavar="DIR", help="--engine ray: the model repository, at this path on every worker")
    g.add_argument("--address", metavar="ADDR",
                   help="--engine ray: the Ray cluster (ray://HEAD:10001, or auto; default: $RAY_ADDRESS, else "
                        "a local Ray)")
    g.add_argument("--concurrency", type=int, metavar="N",
                   help="--engine ray: scoring actors (default: the cluster's CPUs)")

    for name, what, verb in (("encode", "examples", "map examples to latent codes"),
                             ("decode", "latent codes", "map latent codes to examples")):
        p = command(name, f"{verb} (.npy in, .npy out)")
        p.add_argument("model", help="model name")
        p.add_argument("input", help=f".npy (or .npz, .csv, .parquet) file of {what}")
        p.add_argument("--out", required=True, help=".npy file to write")
        p.add_argument("--sample", action="store_true",
                       help="draw from q(z|x) / p(x|z) instead of taking its mean")
        p.add_argument("--seed", type=int, help="random seed for --sample (default: drawn)")
        p.add_argument("--key", help=".npz: the array to read")
        p.add_argument("--chunk-size", type=int, default=4096, metavar="N",
                       help="rows per request (default 4096)")
        p.add_argument("--version", type=int, default=0, help="model version (default 0: the highest)")
        if name == "decode":
            p.add_argument("--png", help="also write a PNG grid of the decoded images")


# -- handlers ------------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace):  # -> genserve.clients.client.Client
    import os

    from genserve.clients.client import Client

    server = args.server or os.environ.get("GENSERVE_SERVER") or "localhost:8500"
    token = args.token or (None if args.token_file else os.environ.get("GENSERVE_TOKEN"))
    client = Client(server, timeout=args.timeout, tls=True if args.tls else None, tls_ca=args.tls_ca,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, token=token, token_file=args.token_file)
    try:
        return client.connect(min(args.timeout, 10.0))  # a wrong address fails at once, with what to check
    except BaseException:
        client.close()
        raise


def _seed(seed: int | None) -> int:
    import secrets

    return secrets.randbits(63) if seed is None else seed


def _out(path: str, suffix: str):  # -> Path with its folder made
    from pathlib import Path

    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ValueError(f"--out {path}: expected a {suffix} file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_grid(path, x, spec) -> str:
    """A PNG grid of the first 256 images; grey levels scaled by the data's levels when discrete."""
    from genserve.clients.images import write_grid

    low, high = (0, spec.levels - 1) if spec.discrete else (None, None)
    write_grid(path, x[:256], low, high)
    return f" and {path} (grid of {min(len(x), 256)})"


def run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.model)
    print(status)
    return 0 if status == "SERVING" else 1


def run_models(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    rows = [("NAME", "VERSIONS", "FAMILY", "MODEL", "OPERATIONS", "STATE")]
    for m in models:
        rows.append((m.name, ",".join(map(str, m.versions)) or "-", m.family or "-", m.model or "-",
                     ",".join(m.operations) or "-", m.state + (f": {m.message}" if m.message else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if not models:
        print("(the server's repository has no models)")
    return 0


def run_load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        m = client.load_model(args.model)
    print(f"{m.name}: {m.state}, versions {','.join(map(str, m.versions)) or '-'}")
    return 0


def run_unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        m = client.unload_model(args.model)
    print(f"{m.name}: {m.state}")
    return 0


NO_METRICS = ("none recorded (export with --metrics EVAL.json from `genserve evaluate CHECKPOINT --json`, or "
              "evaluate before exporting)")


def run_info(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        info = client.info(args.model, args.version)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    spec = info.spec
    domain = f"discrete, {spec.levels} levels" if spec.discrete else "continuous"
    lines = [
        f"{info.name} v{info.version} ({info.state}; versions {', '.join(map(str, info.versions))},"
        f" default {info.default_version})",
        f"  {info.family} / {info.model}: {info.description}".rstrip(": "),
        f"  data: {spec.name}, shape {'x'.join(map(str, spec.shape))}, {domain}",
        f"  operations: {', '.join(info.operations)}",
        f"  likelihood: {info.likelihood}",
        f"  parameters: {', '.join(f'{k}={v:g}' for k, v in sorted(info.parameters.items())) or '-'}",
        f"  test metrics: {', '.join(f'{k}={v:.4g}' for k, v in sorted(info.test_metrics.items())) or NO_METRICS}",
        f"  serving: {', '.join(f'{k}={v}' for k, v in sorted(info.serving.items())) or '-'}",
        f"  providers: {', '.join(info.providers) or '-'}",
    ]
    kinds = info.score_kinds
    if kinds:  # what `genserve score --score-kind` can ask for, and whether --below-percentile works for it
        lines.append("  scores (genserve score --score-kind; percentiles where calibrated):")
        lines += [f"    {kind.describe()}" for kind in kinds.values()]
    print("\n".join(lines))
    return 0


def run_sample(args: argparse.Namespace) -> int:
    import numpy as np

    out = _out(args.out, ".npy")
    seed = _seed(args.seed)
    with _client(args) as client:
        info = client.info(args.model, args.version)
        drawn = client.sample(args.model, args.n, seed=seed, temperature=args.temperature,
                              langevin_steps=args.langevin_steps, langevin_step_size=args.langevin_step_size,
                              return_latents=bool(args.latents), version=info.version, progress=not args.quiet)
    x, z = drawn if args.latents else (drawn, None)
    np.save(out, x)
    wrote = f"{out} {tuple(x.shape)} {x.dtype}"
    if args.latents:
        if z is None:
            raise ValueError(f"{args.model} returned no latent codes ({info.model} has none); drop --latents")
        np.save(_out(args.latents, ".npy"), z)
        wrote += f", {args.latents} {tuple(z.shape)}"
    if x.ndim == 3 and not args.no_png:
        wrote += _write_grid(_out(args.png, ".png") if args.png else out.with_suffix(".png"), x, info.spec)
    elif args.png:
        wrote += f" (no PNG: examples of shape {x.shape[1:]} are not images)"
    print(f"sampled {len(x)} from {info.name} v{info.version} with seed {seed}; wrote {wrote}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    from genserve.clients.datafiles import open_rows
    from genserve.clients.score_columns import ScoreColumns, WorstRows
    from genserve.clients.score_tables import TableWriter, table_format

    if args.engine != "grpc":  # genserve.app.cli runs --engine ray (it needs the server station, not a client)
        raise ValueError(f"--engine {args.engine} runs through the genserve command (genserve.app.cli)")
    check_score_args(args)
    out = "-" if args.out in (None, "-") else args.out
    table_format(out)
    if args.explain:
        _out(args.explain, ".png")
    seed = _seed(args.seed)
    started = time.perf_counter()
    with _client(args) as client:
        info = client.info(args.model, args.version)
        plan = ScoreColumns.plan(args, info.name, info.version, info.manifest)
        if args.explain and len(info.spec.shape) not in (2, 3):
            raise ValueError(f"--explain draws images; {info.name}'s examples have shape {info.spec.shape}")
        rows = open_rows(args.input, shape=info.spec.shape, key=args.key, id_columns=args.id_column,
                         columns=[c.strip() for c in args.columns.split(",")] if args.columns else None)
        sent: dict[int, object] = {}
        worst = WorstRows(args.explain_rows) if args.explain else None
        if worst is not None:
            rows.watch(sent.__setitem__)  # the examples of chunks in flight, to draw the worst beside their maps
        # A bar on a terminal only: redraws in a pipe or a log file are noise (the client's own check lets
        # tqdm.auto's class through, which draws anywhere).
        stream = client.iter_scores(args.model, rows, args.chunk_size, progress=not args.quiet and sys.stderr.isatty(),
                                    max_in_flight=args.in_flight, seed=seed,
                                    importance_samples=args.importance_samples, version=info.version,
                                    **plan.request(explain=worst is not None))
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.closing(stream))  # a failure half way cancels the stream at once
            if args.quantile is not None:  # two passes: the batch's quantile is known once every row is scored
                folder = None if out == "-" else Path(out).parent
                if folder is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=folder, prefix=".genserve-")))
                first = scratch / ("pass1.csv" if out == "-" else "pass1" + Path(out).suffix.lower())
            else:
                first = out
            log_probs = []
            version, kind = info.version, info.likelihood
            with TableWriter(first) as table:
                for offset, part in stream:
                    cols = plan.columns(offset, part, rows.take_ids(len(part)))
                    table.write(cols)
                    version, kind = part.version, part.kind
                    if args.quantile is not None:
                        log_probs.append(cols["log_prob_nats"])
                    if worst is not None:
                        worst.add(sent.pop(offset), part.per_dimension, cols, plan.badness(cols))
                if not table.rows:
                    raise ValueError(f"{args.input} has no rows to score")
            cut = None
            if args.quantile is not None:
                import numpy as np

                log_prob = np.concatenate(log_probs)
                cut = float(np.quantile(log_prob, args.quantile))
                _add_outliers(first, out, log_prob < cut)
                plan.flagged = int((log_prob < cut).sum())
    line = score_line(args, info.name, version, kind, seed, time.perf_counter() - started, plan, cut, out)
    if worst is not None:
        line += _draw_worst(args.explain, worst, plan, info, args.id_column)
    print(line, file=sys.stderr if out == "-" else sys.stdout)  # stdout holds the CSV
    return 0


def score_line(args: argparse.Namespace, name: str, version: int, kind: str, seed: int, seconds: float, plan,
               cut: float | None, out: str) -> str:
    """The line `genserve score` prints when done (every engine prints the same)."""
    line = (f"scored {plan.rows} rows of {args.input} with {name} v{version} ({kind}, seed {seed}) in {seconds:.1f} s:"
            f" {plan.summary()}")
    if cut is not None:
        line += f"; {plan.flagged} outliers below the {args.quantile:g} quantile {cut:.4g} nats of this batch"
    return f"{line}; wrote {'stdout' if out == '-' else out}"


def _add_outliers(first, out, outlier) -> None:
    """The second pass of --quantile: copy the first pass's table, adding the outlier column."""
    from genserve.clients.score_tables import TableWriter, read_table_chunks

    start = 0
    with TableWriter(out) as table:
        for chunk in read_table_chunks(first):
            n = len(next(iter(chunk.values())))
            table.write({**chunk, "outlier": outlier[start:start + n]})
            start += n


def _draw_worst(path: str, worst, plan, info, id_columns: list[str]) -> str:
    from genserve.clients.images import write_explanation

    rows = worst.rows
    if not rows:
        return ""
    primary = plan.kinds[0].name
    titles = []
    for i in range(len(rows["x"])):
        who = f"row {rows['row'][i]}" + "".join(f" {c}={rows[c][i]}" for c in id_columns[:1])
        value = rows["log_prob_nats"][i] if primary == "log_prob" else rows[primary][i]
        what = f"{'log p' if primary == 'log_prob' else primary} {float(value):.4g}"
        if plan.percentile:
            what += f", pct {float(rows['percentile'][i]):.3g}"
        titles.append(f"{who}\n{what}")
    spec = info.spec
    low, high = (0, spec.levels - 1) if spec.discrete else (None, None)
    write_explanation(_out(path, ".png"), rows["x"], rows["per_dimension"], titles, low, high)
    drawn = ", ".join(str(r) for r in rows["row"])
    return f" and {path} ({len(titles)} most anomalous rows explained: rows {drawn})"


def check_score_args(args: argparse.Namespace) -> None:
    """The score options every engine checks the same way."""
    if args.quantile is not None and not 0 < args.quantile < 1:
        raise ValueError(f"--quantile must be between 0 and 1, got {args.quantile}")
    if args.below_percentile is not None and not 0 < args.below_percentile < 100:
        raise ValueError(f"--below-percentile must be between 0 and 100, got {args.below_percentile:g}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.explain_rows < 1:
        raise ValueError(f"--explain-rows must be >= 1, got {args.explain_rows}")
    if args.engine == "grpc":
        given = [f"--{name}" for name in ("repo", "address", "concurrency") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --engine ray; a server (--server) has its own repository")


def _latent_map(args: argparse.Namespace, method: str) -> int:
    import numpy as np

    from genserve.clients.client import chunk_seed
    from genserve.clients.datafiles import open_rows

    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    out = _out(args.out, ".npy")
    seed = _seed(args.seed)
    with _client(args) as client:
        info = client.info(args.model, args.version)
        # Examples take the model's shape; latent codes keep the shape they were saved with.
        rows = open_rows(args.input, shape=info.spec.shape if method == "encode" else None, key=args.key)
        call = getattr(client, method)
        parts, offset = [], 0
        for chunk in rows.chunks(args.chunk_size):
            parts.append(call(args.model, chunk, seed=chunk_seed(seed, offset), sample=args.sample,
                              version=info.version))
            offset += len(chunk)
    if not parts:
        raise ValueError(f"{args.input} has no rows")
    result = np.concatenate(parts)
    np.save(out, result)
    wrote = f"{out} {tuple(result.shape)}"
    if method == "decode" and args.png:
        if result.ndim != 3:
            raise ValueError(f"--png: {info.name} decodes to shape {result.shape[1:]}, not images")
        wrote += _write_grid(_out(args.png, ".png"), result, info.spec)
    print(f"{method}d {len(result)} rows with {info.name} v{info.version}" +
          (f" (sampled, seed {seed})" if args.sample else "") + f"; wrote {wrote}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    return _latent_map(args, "encode")


def run_decode(args: argparse.Namespace) -> int:
    return _latent_map(args, "decode")
