"""`genserve serve`: run the model server (gRPC, health, reflection, metrics, OIP over HTTP) from a config and flags."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  genserve serve --repo model_repository
  genserve serve --repo /models --host 0.0.0.0 --port 8500 --metrics-port 8502 --provider cuda
  genserve serve --repo model_repository --http-port 8503          # also KServe v2 REST / tritonclient.http
  genserve serve --repo model_repository --processes 2            # two server processes on one port
  genserve serve --config server.toml --max-batch-size 128 --max-queue-delay-ms 5
  genserve serve --repo /models --model-control-mode poll --poll-s 30     # pick up new version folders
  genserve serve --repo /models --model-control-mode explicit --load-model digits-vae   # then load/unload
  python -m genserve.server.cli --repo model_repository --port 0     # any free port, printed when ready
  genserve serve --repo /models --tls-cert srv.pem --tls-key srv.key --token-file /etc/genserve/tokens
  genserve serve --repo /models --tls-cert srv.pem --tls-key srv.key --tls-client-ca clients-ca.pem

settings: defaults < --config TOML < GENSERVE_<SETTING> environment variables (GENSERVE_PORT=8500,
GENSERVE_REPO=/models, GENSERVE_HTTP_PORT=8503, GENSERVE_OPEN_HEALTH=false, ...) < flags.

signals: SIGTERM/SIGINT drain accepted requests (up to --grace-s) and exit; SIGHUP reloads the repository
(and re-reads --token-file).
"""

FLAGS: list[tuple[str, str, type, str, str]] = [
    ("--host", "host", str, "ADDR", "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"),
    ("--port", "port", int, "N", "gRPC port (default 8500; 0 = any free port)"),
    ("--metrics-port", "metrics_port", int, "N", "Prometheus /metrics HTTP port (default 8502; 0 = off)"),
    ("--http-port", "http_port", int, "N",
     "Open Inference Protocol HTTP/JSON port (default 0 = off; 8503 by convention)"),
    ("--provider", "provider", str, "{auto,cpu,cuda}", "ONNX Runtime provider (auto: CUDA if it loads)"),
    ("--max-batch-size", "max_batch_size", int, "N", "most rows merged into one graph call (default 512)"),
    ("--max-queue-delay-ms", "max_queue_delay_ms", float, "MS", "longest wait for a batch to fill (2)"),
    ("--max-queue-size", "max_queue_size", int, "N", "most queued requests per graph (default 4096)"),
    ("--instances", "instances", int, "N",
     "concurrent calls per graph (default 0, auto: 2 sharing one session on the CPU with 2+ cores, else 1)"),
    ("--threads", "intra_op_threads", int, "N", "ONNX Runtime intra-op threads per session (default 1)"),
    ("--inter-op-threads", "inter_op_threads", int, "N", "ONNX Runtime inter-op threads (default 1)"),
    ("--workers", "workers", int, "N", "threads running ONNX Runtime calls (default 4)"),
    ("--processes", "processes", int, "N", "server processes sharing the ports, one engine each (default 1)"),
    ("--max-sample-n", "max_sample_n", int, "N", "most samples per request (default 100000)"),
    ("--max-rows-per-request", "max_rows_per_request", int, "N", "most rows per scored batch (65536)"),
    ("--max-message-mb", "max_message_mb", int, "MIB", "gRPC message size limit each way (default 64)"),
    ("--grace-s", "grace_s", float, "S", "seconds to finish accepted requests after SIGTERM (default 10)"),
    ("--max-connection-age-s", "max_connection_age_s", float, "S",
     "close client connections after ~S s so balancing clients see new pods (default 0 = never)"),
    ("--max-connection-age-grace-s", "max_connection_age_grace_s", float, "S",
     "calls in flight get this long after the age (default 0 = max-deadline-s)"),
    ("--model-control-mode", "model_control", str, "{none,poll,explicit}",
     "none: load every model at start; poll: and rescan every --poll-s; explicit: load/unload by request"),
    ("--poll-s", "poll_s", float, "S", "with --model-control-mode poll: rescan every S seconds (default 5)"),
    ("--warmup", "warmup", bool, "", "run a small batch through every graph at load (default on; --no-warmup)"),
    ("--max-concurrent-rpcs", "max_concurrent_rpcs", int, "N",
     "most RPCs in progress at once; more get RESOURCE_EXHAUSTED (default 1024)"),
    ("--max-queued-rows", "max_queued_rows", int, "N",
     "most rows held by requests in progress, server-wide (default 1048576)"),
    ("--max-deadline-s", "max_deadline_s", float, "S",
     "deadline ceiling: no request (or stream chunk) runs longer (default 300)"),
    ("--inline-call-us", "inline_call_us", float, "US",
     "run a lone request's graph call on the event loop when such calls take < US (default: 16 thread "
     "hand-offs, measured at start; 0 = never)"),
    ("--inline-idle-call-us", "inline_idle_call_us", float, "US",
     "the same up to US when nothing else is in flight in the whole server (default: 4x --inline-call-us; "
     "0 = never)"),
    ("--busy-delay-factor", "busy_delay_factor", float, "X",
     "while the event loop is saturated, a batch waits up to X times max_queue_delay_ms (default 5; 1 = never "
     "longer)"),
    ("--switch-interval-ms", "switch_interval_ms", float, "MS",
     "GIL switch interval of the server process (default 0.2; Python's own is 5)"),
    ("--malloc-arena-max", "malloc_arena_max", int, "N",
     "glibc malloc arenas of the server process (default 2; 0 = glibc's default)"),
    ("--tls-cert", "tls_cert", str, "PEM", "server certificate chain: serve TLS only (with --tls-key)"),
    ("--tls-key", "tls_key", str, "PEM", "private key of --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", str, "PEM", "require client certificates signed by this CA (mTLS)"),
    ("--metrics-tls", "metrics_tls", bool, "", "serve /metrics over HTTPS with --tls-cert (mTLS with --tls-client-ca)"),
    ("--token-file", "token_file", str, "PATH", "bearer tokens, one per line: every RPC must send one"),
    ("--token-env", "token_env", str, "VAR", "environment variable holding bearer tokens (comma-separated)"),
    ("--open-health", "open_health", bool, "", "health checks need no token (default on; --no-open-health)"),
    ("--open-reflection", "open_reflection", bool, "", "server reflection needs no token (default off)"),
    ("--access-log", "access_log", bool, "", "one log line per finished request (default off)"),
    ("--otlp-endpoint", "otlp_endpoint", str, "URL",
     "send OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://collector:4317 (default off)"),
]
"""flag, ServerConfig field, type, metavar, help. Model-level batching settings (batch size, delay, queue,
instances) are defaults: a model's manifest and its config.json override them."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(handler=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", metavar="DIR",
                   help="model repository (REPO/NAME/VERSION/manifest.json), or repo in --config")
    p.add_argument("--config", metavar="TOML",
                   help="server settings file (.toml) with ServerConfig keys; flags override it")
    for flag, dest, kind, metavar, help_text in FLAGS:
        if kind is bool:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=help_text)
    p.add_argument("--load-model", dest="load_models", action="append", metavar="NAME",
                   help="with --model-control-mode explicit: load this model at start (repeatable; '*' = all)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="server log level on stderr (default INFO)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="stderr log lines as text, or one JSON object per line (default text)")


def build_config(args: argparse.Namespace):  # -> ServerConfig (imported lazily)
    """The ServerConfig from --config, then --repo and the flags; ValueError naming what is wrong."""
    from genserve.server.config import ServerConfig

    overrides = {dest: getattr(args, dest) for _, dest, *_ in FLAGS if getattr(args, dest) is not None}
    if args.repo:
        overrides["repo"] = args.repo
    if args.load_models:
        overrides["load_models"] = ",".join(args.load_models)
    return ServerConfig.from_toml(args.config, overrides, environ=dict(os.environ))


def run(args: argparse.Namespace) -> int:
    import asyncio

    from genserve.server.app import serve
    from genserve.server.logs import configure

    configure(args.log_level, args.log_format)
    cfg = build_config(args)
    if cfg.processes > 1:
        from genserve.server.workers import supervise

        return supervise(cfg, announce=lambda line: print(line, flush=True), log_level=args.log_level,
                         log_format=args.log_format)
    return asyncio.run(serve(cfg, announce=lambda line: print(line, flush=True)))


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m genserve.server.cli`` (same flags as ``genserve serve``)."""
    from genserve.core.cli_errors import guarded

    p = argparse.ArgumentParser(prog="genserve serve", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    args = p.parse_args(argv)
    args.command = "serve"
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
