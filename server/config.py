"""Server configuration: one validated dataclass (TOML file + overrides) and per-model serving settings."""

from __future__ import annotations

import contextlib
import functools
import math
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from genserve.v1 import manifest_pb2 as pb

PROVIDERS = ("auto", "cuda", "cpu")
MODEL_CONTROL = ("none", "poll", "explicit")
DEFAULT_POLL_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is started with; loaded once (``from_toml`` + overrides) and passed down."""

    repo: Path
    """Model repository folder: ``REPO/NAME/VERSION/manifest.json`` (see genserve.core.manifest)."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds; ``0.0.0.0`` to accept remote clients."""
    port: int = 8500
    """gRPC port (0: pick a free one)."""
    metrics_port: int = 8502
    """Prometheus /metrics HTTP port (0: no metrics endpoint)."""
    http_port: int = 0
    """Open Inference Protocol over HTTP/JSON (KServe v2 REST, Triton's HTTP API) port; 0: off (the default,
    so servers started without naming it never contend for a fixed port); 8503 by convention beside gRPC's
    8500 and metrics' 8502. Same host, TLS and tokens as the gRPC port (server/http_face.py)."""
    provider: str = "auto"
    """ONNX Runtime provider: ``auto`` (CUDA when it loads, else CPU), ``cuda`` or ``cpu``."""
    intra_op_threads: int = 1
    """Threads inside one ONNX Runtime call (0: ORT's default)."""
    inter_op_threads: int = 1
    """Threads across independent graph nodes (0: ORT's default)."""
    max_batch_size: int = 512
    """Most rows merged into one graph call (default; per-model config.json overrides). 512 rather than 64:
    a 1-row flow score is 16 graph rows and a VAE score 500, so larger calls mean fewer of them, and fewer
    GIL hand-offs (BENCHMARKS.md: 850 vs 628 flow and 127 vs 85 VAE requests/s at 64 clients)."""
    max_queue_delay_ms: float = 2.0
    """Longest wait, in ms, of the first queued request for others to join its batch (0: never wait)."""
    max_queue_size: int = 4096
    """Most requests queued per graph before new ones fail with RESOURCE_EXHAUSTED."""
    instances: int = 0
    """Calls per graph running batches concurrently (default; config.json overrides); on the CPU with one
    intra-op thread they share one session. 0: auto (``ServingSettings.instances``)."""
    max_rows_per_request: int = 65536
    """Most rows of x or z in one LogLikelihood / Encode / Decode request."""
    max_sample_n: int = 100000
    """Most samples in one Sample request."""
    max_message_mb: int = 64
    """gRPC send/receive message limit in MiB."""
    max_langevin_steps: int = 10000
    """Most Langevin steps one Sample request may ask for."""
    max_importance_samples: int = 5000
    """Most importance samples K one LogLikelihood request may ask for."""
    max_dequant_draws: int = 256
    """Most dequantisation draws (``draws``) one LogLikelihood request may ask for (flows, pPCA on discrete data)."""
    grace_s: float = 10.0
    """Seconds SIGTERM waits for accepted requests to finish before the server exits."""
    max_connection_age_s: float = 0.0
    """Close each client connection after about this many seconds (gRPC adds +-10% jitter; calls in flight
    finish), so clients balancing over a headless Service reconnect and see new pods; 0: never."""
    max_connection_age_grace_s: float = 0.0
    """After max_connection_age_s, how long calls in flight may still run before the connection is closed;
    0: max_deadline_s (no call the server accepts is cut off)."""
    model_control: str = "none"
    """How models come and go while the server runs (Triton's model control modes): ``none`` (every model of
    the repository loads at start; it changes only on ReloadRepository or SIGHUP), ``poll`` (the same, and
    the repository is rescanned every ``poll_s`` seconds), ``explicit`` (only ``load_models`` load at start;
    LoadModel / UnloadModel requests, gRPC or HTTP, load and unload models). Load and unload requests are
    refused (FAILED_PRECONDITION) unless the mode is ``explicit``."""
    load_models: str = ""
    """With ``model_control = "explicit"``: comma-separated model names to load at start (``*``: all)."""
    poll_s: float = 0.0
    """With ``model_control = "poll"``: rescan the repository every this many seconds (0 there means 5)."""
    warmup: bool = True
    """Default of each model's ``warmup`` (config.json overrides): a small batch through every graph at load."""
    workers: int = 4
    """Threads of the pool that runs ONNX Runtime calls off the event loop (shared by all graphs)."""
    processes: int = 1
    """Server processes on the same ports (SO_REUSEPORT), each with its own engine, batchers and sessions, so
    N event loops use N cores; one /metrics for all (server/workers.py)."""
    max_concurrent_rpcs: int = 1024
    """Most RPCs in progress at once (a stream counts as one, health checks too); gRPC refuses the next with
    RESOURCE_EXHAUSTED, so a flood of connections cannot pile up handler tasks without bound."""
    max_queued_rows: int = 1048576
    """Most rows of requests accepted and not yet answered, summed over every model and RPC (a Sample request
    counts n, a stream the rows it holds at once); beyond it new requests get RESOURCE_EXHAUSTED."""
    max_deadline_s: float = 300.0
    """Deadline ceiling, seconds: a request with no deadline, or a longer one, is cut off after this long
    (DEADLINE_EXCEEDED); for streams it bounds each chunk's work, not the whole stream."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with ``tls_key`` the gRPC port speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificates; when set, clients must present a certificate signed by one (mutual TLS)."""
    metrics_tls: bool = False
    """Serve /metrics over HTTPS with ``tls_cert`` / ``tls_key``; with ``tls_client_ca`` the scraper must
    present a certificate signed by it (mutual TLS), as gRPC clients must. Off: plain HTTP (bind the metrics
    port to a private network, or leave it off with metrics_port 0)."""
    token_file: Path | None = None
    """File of bearer tokens, one per line (blank lines and ``#`` comments skipped); when set (or
    ``token_env``), every RPC needs ``authorization: Bearer <token>`` metadata. Re-read on reload (SIGHUP)."""
    token_env: str = ""
    """Name of an environment variable holding bearer tokens (separated by whitespace or commas), read at
    start; the name goes in the config, never the tokens."""
    open_health: bool = True
    """With token auth: grpc.health.v1.Health (and the OIP ServerLive/ServerReady probes) need no token."""
    open_reflection: bool = False
    """With token auth: server reflection needs no token."""
    switch_interval_ms: float = 0.2
    """Python's GIL switch interval in the server process, ms (Python's default is 5). Every small numpy
    call that releases the GIL on the event loop (noise draws, for one) must win it back from the ONNX
    Runtime worker threads; a short interval keeps that wait short, so 1-row requests cost less loop time."""
    malloc_arena_max: int = 2
    """glibc malloc arenas of the server process (0: glibc's default, 8 per core). Threads that allocate under
    load each grow an arena that glibc keeps after the peak; 2 keeps resident memory flat (MALLOC_ARENA_MAX)."""
    access_log: bool = False
    """Log one line per finished request (logger ``genserve.access``: method, model, rows, status code,
    latency, request id; JSON fields with ``--log-format json``). Off by default: a log line costs the event
    loop tens of microseconds per request."""
    otlp_endpoint: str = ""
    """OpenTelemetry: send traces (a span per RPC, per queue wait and per ONNX Runtime call; server/tracing.py) to
    this OTLP/gRPC collector, e.g. ``http://collector:4317`` (``https://`` for TLS); empty: tracing off (the
    default; nothing of OpenTelemetry is loaded). Needs ``pip install 'genserve[otel]'``."""
    inline_call_us: float | None = None
    """Run a graph call on the event loop's own thread, not a worker thread, when every request in flight on
    the model is in that call and calls of its size have lately taken less than this, microseconds (0: always
    a worker thread). A lone request then skips two thread hand-offs (the worker's wake-up and the loop's),
    which cost more server CPU than a cheap graph's call itself; nothing of that model could run meanwhile,
    and other models wait at most this long. Unset (the default): 16 hand-offs of this machine, measured when
    the server starts (about 400 us on a fast core, 1.4 ms on a core three times slower), within 100 us..5 ms;
    the server logs the figure it chose."""
    busy_delay_factor: float = 5.0
    """While the event loop is saturated (its thread on a CPU at least 70% of the last 0.1 s: many clients, whose
    requests wait for the loop to read them rather than for the graph), a forming batch waits up to this many
    times the model's ``max_queue_delay_ms`` for company (1: never longer). Batches that fill, or hold every
    request in flight, still go at once. At 64 clients of 1-row flow requests calls held 31-54 rows instead of
    11-15 and ONNX Runtime's threads spent 35-91 us of CPU per request instead of 80-161; over 14 paired rounds
    the requests/s were 1.09x (median; 0.79-1.28x), server CPU per request 0.90x and p99 1.01x (BENCHMARKS.md).
    The event loop's own work per request, which bounds a 2-core machine, does not shrink with larger calls."""
    inline_idle_call_us: float | None = None
    """The same for calls that lately took less than this, microseconds (above ``inline_call_us``), when
    moreover nothing else is in flight in the whole server and nothing was lately: a lone large request (64
    rows of a flow take about 1 to 4 ms) skips the hand-offs too, as in a server without a batcher, and a
    request that arrives meanwhile waits at most this long to be read. Unset (the default): 4 times
    ``inline_call_us`` (chosen or measured); 0: never. On a slow core a lone client's 64-row requests got
    1.1x the requests/s (0.95x KServe against 0.84x) and about 10% less server CPU; on a fast one, earlier, p99
    was 1.6-2x worse in four A/Bs with the same requests/s (BENCHMARKS.md): set 0 where the tail of a lone
    client matters more than its CPU."""
    pad_batches: str = "auto"
    """Pad ONNX Runtime calls: ``buckets`` (to the smallest of a few sizes that holds the call: 16, 64, 256, ...
    up to max_batch_size), ``on`` (every call to max_batch_size: one shape, so a row's answer never depends on
    its batch, at the cost of running max_batch_size rows for a 1-row call), ``off``, or ``auto`` (buckets for
    CUDA sessions, whose kernels may pick another algorithm per shape; off on the CPU, whose kernels give each
    row the same bits at any batch size)."""

    def load_model_names(self) -> set[str]:
        """The names of ``load_models`` (``*`` among them: every model of the repository)."""
        return {n.strip() for n in self.load_models.split(",") if n.strip()}

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value) if value not in (None, "") else None)
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.model_control not in MODEL_CONTROL:
            raise ValueError(f"model_control must be one of {', '.join(MODEL_CONTROL)}, got {self.model_control!r}")
        if self.poll_s and self.model_control != "poll":
            raise ValueError(f"poll_s ({self.poll_s}) rescans the repository only with model_control = \"poll\" "
                             f"(it is {self.model_control!r}); set both, or leave poll_s 0")
        if self.model_control == "poll" and not self.poll_s:
            object.__setattr__(self, "poll_s", DEFAULT_POLL_S)
        if self.load_models and self.model_control != "explicit":
            raise ValueError(f"load_models ({self.load_models!r}) chooses the models of model_control = "
                             f"\"explicit\" (it is {self.model_control!r}); the other modes load every model")
        if self.pad_batches not in ("auto", "buckets", "on", "off"):
            raise ValueError(f"pad_batches must be auto, buckets, on or off, got {self.pad_batches!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError(f"thread counts must be >= 0 (0: ORT default), got intra_op_threads="
                             f"{self.intra_op_threads}, inter_op_threads={self.inter_op_threads}")
        if self.instances < 0:
            raise ValueError(f"instances must be >= 0 (0: auto), got {self.instances}")
        for name in ("max_batch_size", "max_queue_size", "max_rows_per_request", "max_sample_n",
                     "max_message_mb", "max_langevin_steps", "max_importance_samples", "max_dequant_draws", "workers",
                     "max_queued_rows", "max_concurrent_rpcs", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "grace_s", "poll_s", "max_connection_age_s", "max_connection_age_grace_s",
                     "inline_call_us", "inline_idle_call_us"):
            value = getattr(self, name)
            if value is None and name in ("inline_call_us", "inline_idle_call_us"):  # derived at start
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.busy_delay_factor) and self.busy_delay_factor >= 1):
            raise ValueError(f"busy_delay_factor must be a finite number >= 1 (1: never wait longer), got "
                             f"{self.busy_delay_factor}")
        if self.malloc_arena_max < 0:
            raise ValueError(f"malloc_arena_max must be >= 0 (0: glibc's default), got {self.malloc_arena_max}")
        if not (math.isfinite(self.switch_interval_ms) and 0 < self.switch_interval_ms <= 1000):
            raise ValueError(f"switch_interval_ms must be in (0, 1000], got {self.switch_interval_ms}")
        if not (math.isfinite(self.max_deadline_s) and self.max_deadline_s > 0):
            raise ValueError(f"max_deadline_s must be a finite number > 0, got {self.max_deadline_s}")
        most = max(self.max_rows_per_request, self.max_sample_n)
        if self.max_queued_rows < most:
            raise ValueError(f"max_queued_rows ({self.max_queued_rows}) must be at least max_rows_per_request "
                             f"({self.max_rows_per_request}) and max_sample_n ({self.max_sample_n}), or the "
                             "largest allowed request could never run")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"TLS needs both tls_cert and tls_key, got tls_cert={self.tls_cert}, "
                             f"tls_key={self.tls_key}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"tls_client_ca ({self.tls_client_ca}) asks for mutual TLS, which needs the "
                             "server's own tls_cert and tls_key")
        if self.metrics_tls and self.tls_cert is None:
            raise ValueError("metrics_tls serves /metrics over HTTPS with the server's certificate, which needs "
                             "tls_cert and tls_key")
        if self.token_env and not self.token_env.replace("_", "").isalnum():
            raise ValueError(f"token_env must name an environment variable (letters, digits, _), got "
                             f"{self.token_env!r}")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint must be an http:// or https:// URL (e.g. http://collector:4317), got "
                             f"{self.otlp_endpoint!r}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port and port must differ, both are {self.port}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ValueError(f"http_port ({self.http_port}) must differ from port ({self.port}) and metrics_port "
                             f"({self.metrics_port})")

    @property
    def serving(self) -> ServingSettings:
        """The server-wide defaults of the per-model settings."""
        return ServingSettings(max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
                               max_queue_size=self.max_queue_size, instances=self.instances,
                               provider=self.provider, intra_op_threads=self.intra_op_threads,
                               warmup=self.warmup)

    @classmethod
    def from_toml(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None, **kwargs: Any) -> ServerConfig:
        """Defaults, then the TOML file (flat keys or a ``[server]`` table), then ``GENSERVE_<KEY>`` variables of
        ``environ`` (as containers are configured; e.g. GENSERVE_PORT=8500, GENSERVE_REPO=/models), then
        overrides (the command line's flags) and kwargs. A GENSERVE_ variable that names no setting is refused."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            try:
                data = tomllib.loads(path.read_text())
            except OSError as e:
                raise ValueError(f"config file {path}: cannot read ({e.strerror or e})") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path}: {e}") from None
            if set(data) == {"server"} and isinstance(data["server"], dict):
                data = data["server"]
            values.update(_checked(data, str(path)))
        token_env = str((overrides or {}).get("token_env") or kwargs.get("token_env") or values.get("token_env") or "")
        values.update(_checked(from_environment(environ or {}, skip={token_env}), "environment"))
        values.update(_checked({**(overrides or {}), **kwargs}, "override", parse_text=False))
        if "repo" not in values:
            raise ValueError("repo is not set; give --repo DIR or `repo = \"DIR\"` in the config file")
        return cls(**values)

    @property
    def auth(self) -> bool:
        """Bearer tokens are required (from ``token_file`` and/or ``token_env``)."""
        return self.token_file is not None or bool(self.token_env)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d


ENV_PREFIX = "GENSERVE_"
ENV_IGNORED = {"GENSERVE_SERVER", "GENSERVE_TOKEN"}
"""Client-side variables (the CLI's default server and token), not server settings."""


def from_environment(environ: dict[str, str], skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ServerConfig settings of ``GENSERVE_<KEY>`` variables, typed by their fields (``true``/``false``,
    ``1``/``0``, ``yes``/``no`` for flags); ValueError naming a variable that is not a setting (a typo) or does not
    parse. ``skip``: variables that are not settings by design (the one ``token_env`` names)."""
    adapters = _adapters()
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_IGNORED or name in skip:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in adapters:
            raise ValueError(f"environment: {name} is not a server setting; known: "
                             f"{', '.join(ENV_PREFIX + k.upper() for k in sorted(adapters))}")
        out[key] = _typed(key, text, f"environment: {name}={text!r}")
    return out


@functools.cache
def _adapters() -> dict[str, TypeAdapter]:
    """A pydantic validator per ServerConfig field, from its type annotation."""
    hints = typing.get_type_hints(ServerConfig)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(ServerConfig)}


def _typed(key: str, value: Any, where: str, parse_text: bool = True) -> Any:
    """``value`` as the type of field ``key``: with ``parse_text``, text (the environment, a quoted TOML value)
    is parsed ("8500" is 8500, "false" False, "maybe" no flag); other values must have the type already (strict:
    2 is 2.0, but True is no worker count, 2.5 no port and, from Python, "64" no batch size); an empty string is
    None where the field allows None (an unset path)."""
    adapter = _adapters()[key]
    if value == "":
        with contextlib.suppress(ValidationError):
            return adapter.validate_python(None)
    try:
        return adapter.validate_python(value, strict=not (parse_text and isinstance(value, str))
                                       and not (isinstance(value, str) and _is_path(key)))
    except ValidationError as e:
        error = e.errors()[0]
        raise ValueError(f"{where}: {key}: {error['msg'].lower()}, got {value!r}") from None


def _is_path(key: str) -> bool:
    """A path setting: a string is its natural form everywhere."""
    return key in _path_fields()


@functools.cache
def _path_fields() -> frozenset[str]:
    hints = typing.get_type_hints(ServerConfig)
    return frozenset(k for k, t in hints.items() if t is Path or Path in typing.get_args(t))


def _checked(values: dict[str, Any], where: str, parse_text: bool = True) -> dict[str, Any]:
    """Keys and values checked against the ServerConfig fields: unknown keys refused, values typed by pydantic
    from the fields' annotations (server/config.py's one source of the types); ``parse_text``: see _typed."""
    known = _adapters()
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        out[key] = _typed(key, value, where, parse_text)
    return out


@dataclass(frozen=True)
class ServingSettings:
    """How one model is batched and run: its config.json, over its manifest, over the server defaults."""

    max_batch_size: int = 512
    """Most rows merged into one graph call; larger requests are split."""
    max_queue_delay_ms: float = 2.0
    """Longest wait of the first queued request for others to join its batch, ms."""
    max_queue_size: int = 4096
    """Most requests queued per graph before QueueFull."""
    instances: int = 0
    """Calls per graph that run at once, each on its own batches. On the CPU with one intra-op thread they share
    one ONNX Runtime session (its Run is thread-safe); on CUDA or with more intra-op threads each instance has
    its own session. 0: auto, resolved when a version loads (``auto_instances``): 2 where they share a session
    on a machine of 2 or more cores (a second call overlaps the event loop's work for large batches: 64-row
    requests ran 1.15x to 1.19x; small batches never start a second call), else 1."""
    provider: str = "auto"
    """``auto``, ``cuda`` or ``cpu``."""
    intra_op_threads: int = 1
    """ONNX Runtime intra-op threads per session (0: ORT's default)."""
    fp16: bool = False
    """Run the graphs' float16 variants where the manifest has them and the provider is CUDA."""
    version_policy: tuple[str, tuple[int, ...]] = ("all", ())
    """Which version folders serve (config.json's ``version_policy``): ``("all", ())``, ``("latest", (n,))``
    (the n highest) or ``("specific", (v, ...))``."""
    warmup: bool = True
    """Run a small batch through every graph before the version serves (the first request then costs what
    the next ones do)."""
    adaptive_batching: bool = True
    """Send a lone request at once when no company is in flight or expected within the delay."""

    def __post_init__(self) -> None:
        if self.instances < 0:
            raise ValueError(f"instances must be >= 0 (0: auto), got {self.instances}")
        for name in ("max_batch_size", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.max_queue_delay_ms) and self.max_queue_delay_ms >= 0):
            raise ValueError(f"max_queue_delay_ms must be finite and >= 0, got {self.max_queue_delay_ms}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        kind, numbers = self.version_policy
        if kind not in ("all", "latest", "specific") or (kind == "all") != (not numbers) or any(
                v < 1 for v in numbers) or (kind == "latest" and len(numbers) != 1):
            raise ValueError(f"version_policy must be all, latest with num_versions >= 1, or specific with "
                             f"versions >= 1; got {kind} {list(numbers)}")

    def select(self, versions: list[int]) -> tuple[list[int], list[int]]:
        """(version folders to serve, ascending; versions the policy names that have no folder)."""
        kind, numbers = self.version_policy
        if kind == "latest":
            return sorted(versions)[-numbers[0]:], []
        if kind == "specific":
            return sorted(set(versions) & set(numbers)), sorted(set(numbers) - set(versions))
        return sorted(versions), []

    def merged(self, *layers: pb.ServingConfig) -> ServingSettings:
        """These settings with the set fields of ``layers`` applied; earlier layers win (config.json)."""
        values = {}
        for layer in reversed(layers):
            for f in pb.ServingConfig.DESCRIPTOR.fields:
                if layer.HasField(f.name):
                    values[f.name] = getattr(layer, f.name)
        if "version_policy" in values:
            values["version_policy"] = _policy(values["version_policy"])
        return replace(self, **values)

    def overridden(self, layer: pb.ServingConfig) -> list[tuple[str, Any, Any]]:
        """(setting, the layer's value, this server-wide value) for each setting the operator changed server-wide
        (it differs from the built-in default) that ``layer`` sets otherwise: per-model settings win, so a
        changed ``--max-queue-delay-ms`` does not reach a model whose config.json sets its own."""
        theirs = ServingSettings().merged(layer)
        return [(f.name, getattr(theirs, f.name), getattr(self, f.name)) for f in fields(self)
                if f.name != "version_policy" and layer.HasField(f.name)
                and getattr(self, f.name) != f.default and getattr(theirs, f.name) != getattr(self, f.name)]

    def to_proto(self) -> pb.ServingConfig:
        """Every field set: what GetModel reports as the settings in effect."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        kind, numbers = values.pop("version_policy")
        policy = pb.VersionPolicy(**{kind: {"latest": lambda: pb.VersionPolicy.Latest(num_versions=numbers[0]),
                                             "specific": lambda: pb.VersionPolicy.Specific(versions=numbers),
                                             "all": pb.VersionPolicy.All}[kind]()})
        return pb.ServingConfig(**values, version_policy=policy)


def _policy(message: pb.VersionPolicy) -> tuple[str, tuple[int, ...]]:
    kind = message.WhichOneof("policy_choice")
    if kind == "latest":
        return kind, (int(message.latest.num_versions),)
    if kind == "specific":
        return kind, tuple(int(v) for v in message.specific.versions)
    if kind == "all":
        return kind, ()
    raise ValueError('version_policy names none of latest, specific, all (e.g. {"latest": {"num_versions": 1}})')
