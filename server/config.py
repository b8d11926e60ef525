"""Server configuration: one validated dataclass (TOML file + overrides) and per-model serving settings."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from genserve.v1 import manifest_pb2 as pb

PROVIDERS = ("auto", "cuda", "cpu")


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
    provider: str = "auto"
    """ONNX Runtime provider: ``auto`` (CUDA when it loads, else CPU), ``cuda`` or ``cpu``."""
    intra_op_threads: int = 1
    """Threads inside one ONNX Runtime call (0: ORT's default)."""
    inter_op_threads: int = 1
    """Threads across independent graph nodes (0: ORT's default)."""
    max_batch_size: int = 64
    """Most rows merged into one graph call (default; per-model config.json overrides)."""
    max_queue_delay_ms: float = 2.0
    """Longest wait, in ms, of the first queued request for others to join its batch (0: never wait)."""
    max_queue_size: int = 4096
    """Most requests queued per graph before new ones fail with RESOURCE_EXHAUSTED."""
    instances: int = 1
    """ONNX Runtime sessions per graph running batches concurrently (default; config.json overrides)."""
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
    grace_s: float = 10.0
    """Seconds SIGTERM waits for accepted requests to finish before the server exits."""
    poll_s: float = 0.0
    """Re-scan the repository every this many seconds (0: reload only on request or signal)."""
    workers: int = 4
    """Threads of the pool that runs ONNX Runtime calls off the event loop (shared by all graphs)."""
    pad_batches: str = "auto"
    """Pad every ONNX Runtime call to max_batch_size rows: ``on``, ``off``, or ``auto`` (on for CUDA sessions,
    whose kernels may pick a different algorithm per batch shape; CPU kernels give each row the same bits at
    any batch size, so padding there only costs time)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.pad_batches not in ("auto", "on", "off"):
            raise ValueError(f"pad_batches must be auto, on or off, got {self.pad_batches!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError(f"thread counts must be >= 0 (0: ORT default), got intra_op_threads="
                             f"{self.intra_op_threads}, inter_op_threads={self.inter_op_threads}")
        for name in ("max_batch_size", "max_queue_size", "instances", "max_rows_per_request", "max_sample_n",
                     "max_message_mb", "max_langevin_steps", "max_importance_samples", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "grace_s", "poll_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port and port must differ, both are {self.port}")

    @property
    def serving(self) -> ServingSettings:
        """The server-wide defaults of the per-model settings."""
        return ServingSettings(max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
                               max_queue_size=self.max_queue_size, instances=self.instances,
                               provider=self.provider, intra_op_threads=self.intra_op_threads)

    def with_overrides(self, overrides: dict[str, Any], where: str = "override") -> ServerConfig:
        """A copy with ``overrides`` applied; unknown keys and wrong types are refused by name."""
        return replace(self, **_checked(overrides, where))

    @classmethod
    def from_toml(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  **kwargs: Any) -> ServerConfig:
        """Defaults, then the TOML file (flat keys or a ``[server]`` table), then overrides and kwargs."""
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
        values.update(_checked({**(overrides or {}), **kwargs}, "override"))
        if "repo" not in values:
            raise ValueError("repo is not set; give --repo DIR or `repo = \"DIR\"` in the config file")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["repo"] = str(self.repo)
        return d


def _checked(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check keys and values against the ServerConfig fields; ints are accepted for floats."""
    kinds = {f.name: f.type for f in fields(ServerConfig)}
    out = {}
    for key, value in values.items():
        if key not in kinds:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(kinds))}")
        kind = kinds[key]
        if kind == "Path":
            if not isinstance(value, str | Path):
                raise ValueError(f"{where}: {key} must be a path, got {value!r}")
            value = Path(value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: {key} must be a number, got {value!r}")
            value = float(value)
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {key} must be a whole number, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be a string, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class ServingSettings:
    """How one model is batched and run: its config.json, over its manifest, over the server defaults."""

    max_batch_size: int = 64
    """Most rows merged into one graph call; larger requests are split."""
    max_queue_delay_ms: float = 2.0
    """Longest wait of the first queued request for others to join its batch, ms."""
    max_queue_size: int = 4096
    """Most requests queued per graph before QueueFull."""
    instances: int = 1
    """ONNX Runtime sessions per graph, each running its own batches concurrently."""
    provider: str = "auto"
    """``auto``, ``cuda`` or ``cpu``."""
    intra_op_threads: int = 1
    """ONNX Runtime intra-op threads per session (0: ORT's default)."""
    fp16: bool = False
    """Run the graphs' float16 variants where the manifest has them and the provider is CUDA."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.max_queue_delay_ms) and self.max_queue_delay_ms >= 0):
            raise ValueError(f"max_queue_delay_ms must be finite and >= 0, got {self.max_queue_delay_ms}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")

    def merged(self, *layers: pb.ServingConfig) -> ServingSettings:
        """These settings with the set fields of ``layers`` applied; earlier layers win (config.json)."""
        values = {}
        for layer in reversed(layers):
            for f in pb.ServingConfig.DESCRIPTOR.fields:
                if layer.HasField(f.name):
                    values[f.name] = getattr(layer, f.name)
        return replace(self, **values)

    def to_proto(self) -> pb.ServingConfig:
        """Every field set: what GetModel reports as the settings in effect."""
        return pb.ServingConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
