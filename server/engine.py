"""The engine: model versions from the repository, each family's operations over batched ONNX Runtime calls.

The transport (server/servicer.py) calls this interface and maps genserve.server.errors to gRPC status codes;
nothing here knows about gRPC. Each operation resolves the model version, validates its inputs against the
manifest's data spec, and runs the family program (server/programs/) with ``run`` bound to the version's
per-graph batchers, so every step of every concurrent request merges into shared ONNX Runtime calls.

Reload swaps a model's table of versions in one assignment: a request holds the version it resolved until it
ends, and a replaced version stops only after its last request finished, so no request in flight fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genserve.core.manifest import LIKELIHOOD_NAME
from genserve.core.noise import Noise
from genserve.server.config import ServerConfig
from genserve.server.errors import InvalidInput, NotFound, NotReady, Unsupported
from genserve.server.metrics import Metrics
from genserve.server.repository import (
    LoadedModel,
    LoadFailed,
    describe_error,
    fingerprint,
    load_version,
    scan,
)

log = logging.getLogger("genserve.server")

METHOD = {"sample": "Sample", "log_likelihood": "LogLikelihood", "encode": "Encode", "decode": "Decode"}
"""Engine operation -> the RPC family name used as the ``method`` metrics label."""
MAX_TEMPERATURE = 100.0
MAX_LANGEVIN_STEP_SIZE = 1e3


@dataclass
class ModelStatus:
    """One model as listed: its loaded versions, default, what it can do, and its state."""

    name: str
    versions: list[int]
    """Loaded (serving) versions, ascending."""
    default_version: int
    """What version 0 resolves to: the highest loaded version; 0 when none is loaded."""
    family: str
    model: str
    operations: list[str]
    """Operation names of the default version: sample, log_likelihood, encode, decode."""
    state: str
    """READY (some version serves), FAILED (none could be loaded), LOADING."""
    message: str = ""
    """Why the model failed, or which versions failed to load."""


@dataclass
class LoadError:
    """A version that failed to load (version 0: the model as a whole)."""

    model: str
    version: int
    message: str


@dataclass
class ReloadResult:
    """What a reload did: every model afterwards and the versions that failed to load."""

    models: list[ModelStatus]
    errors: list[LoadError] = field(default_factory=list)
    loaded: list[tuple[str, int]] = field(default_factory=list)
    unloaded: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Entry:
    """A model's served versions and its failed ones; ``versions`` is replaced whole, never edited."""

    versions: dict[int, LoadedModel] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    loading: bool = False


class Engine:
    """Serves the model repository ``cfg.repo``; see server_common for the agreed interface."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._models: dict[str, _Entry] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._started = False

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model version; one that fails is recorded (FAILED + message) and the others serve."""
        if not self.cfg.repo.is_dir():
            raise ValueError(f"model repository {self.cfg.repo} is not a folder; export a model into it with "
                             "`genserve export CHECKPOINT --repo DIR` or pass the right --repo")
        self._executor = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="genserve-ort")
        self._started = True
        result = await self.reload()
        for e in result.errors:
            log.warning("model %s version %s failed to load: %s", e.model, e.version, e.message)

    async def stop(self) -> None:
        """Finish what is queued, then stop the batchers and the thread pool (after the transport drained)."""
        models = [m for e in self._models.values() for m in e.versions.values()]
        self._models = {}
        await asyncio.gather(*(m.retire() for m in models), *self._retiring, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._started = False

    async def reload(self) -> ReloadResult:
        """Re-scan: load new and changed versions before retiring old ones; a failing new version leaves the
        version it would replace serving; versions gone from disk retire after their requests finish."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> ReloadResult:
        repo = self.cfg.repo
        try:
            found = await asyncio.to_thread(scan, repo)
        except OSError as e:
            raise NotReady(f"cannot read the model repository {repo}: {e}") from None
        result = ReloadResult(models=[])
        for name in sorted(set(found) | set(self._models)):
            entry = self._models.setdefault(name, _Entry())
            old = entry.versions
            new: dict[int, LoadedModel] = {}
            errors: dict[int, str] = {}
            entry.loading = not old
            for version in found.get(name, []):
                current = old.get(version)
                if current is not None and current.fingerprint == fingerprint(repo, name, version):
                    new[version] = current
                    continue
                try:
                    new[version] = await asyncio.to_thread(self._load, name, version)
                    result.loaded.append((name, version))
                except LoadFailed as e:
                    errors[version] = str(e)
                except Exception as e:  # noqa: BLE001 - an unexpected failure is still one model's failure
                    log.exception("loading %s version %s", name, version)
                    errors[version] = describe_error(e)
                if version in errors:
                    result.errors.append(LoadError(name, version, errors[version]))
                    if current is not None:
                        new[version] = current  # a changed version that fails keeps its old files serving
            if name in found and not found[name]:
                errors[0] = f"{repo / name} has no version folders (1, 2, ...); export a model into it"
                result.errors.append(LoadError(name, 0, errors[0]))
            old_errors = entry.errors
            entry.versions, entry.errors, entry.loading = new, errors, False  # the atomic swap
            for version, m in old.items():
                if new.get(version) is not m:
                    self._retire(m)
                    if version not in new:
                        result.unloaded.append((name, version))
            self._report_loaded(name, new, errors, set(old) | set(old_errors))
            if name not in found:
                del self._models[name]
        result.models = self.list_models()
        return result

    def _load(self, name: str, version: int) -> LoadedModel:
        m = self.metrics
        return load_version(self.cfg.repo, name, version, self.cfg.serving, self.cfg.inter_op_threads,
                            executor=self._executor, observe=None if m is None else m.observe_batch,
                            on_depth=None if m is None else m.set_queue_depth, pad_batches=self.cfg.pad_batches)

    def _retire(self, m: LoadedModel) -> None:
        task = asyncio.ensure_future(m.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _report_loaded(self, name: str, new: dict[int, LoadedModel], errors: dict[int, str],
                       before: set[int]) -> None:
        """genserve_model_loaded: 1 serving, 0 failed; series of versions that left the repository go."""
        if self.metrics is None:
            return
        for version in before - set(new) - set(errors) - {0}:
            self.metrics.set_model_loaded(name, version, None)
        for version in new:
            self.metrics.set_model_loaded(name, version, True)
        for version in set(errors) - set(new) - {0}:
            self.metrics.set_model_loaded(name, version, False)

    # ---- queries -----------------------------------------------------------------------------------
    def list_models(self) -> list[ModelStatus]:
        out = []
        for name in sorted(self._models):
            entry = self._models[name]
            versions = sorted(entry.versions)
            default = entry.versions[versions[-1]] if versions else None
            message = "; ".join(f"version {v} failed to load: {msg}" if v else msg
                                for v, msg in sorted(entry.errors.items()))
            state = "READY" if versions else ("LOADING" if entry.loading else "FAILED")
            out.append(ModelStatus(
                name=name, versions=versions, default_version=versions[-1] if versions else 0,
                family=default.family if default else "", model=default.model if default else "",
                operations=list(default.operations) if default else [], state=state, message=message))
        return out

    def get_model(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded version (0: the default, the highest); NotFound / NotReady say what exists."""
        entry = self._models.get(name)
        if entry is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"no model named {name!r}; this server has: {known}")
        versions = entry.versions  # one read: a concurrent reload swaps the whole table
        if not versions:
            why = "; ".join(entry.errors.values()) or "it is loading"
            raise NotReady(f"model {name!r} has no version that loaded: {why}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            failed = f" (it failed to load: {entry.errors[version]})" if version in entry.errors else ""
            raise NotFound(f"model {name!r} has no version {version}{failed}; loaded versions: "
                           f"{', '.join(map(str, sorted(versions)))} (0 = default, the highest)")
        return versions[version]

    def ready(self, name: str | None = None) -> bool:
        """Per model: it has a serving version. Overall: the repository was loaded (a model that failed to
        load is reported as not ready by name, but does not take the server out of service)."""
        if not self._started:
            return False
        if name is not None:
            entry = self._models.get(name)
            return entry is not None and bool(entry.versions)
        return not any(e.loading for e in self._models.values())

    # ---- operations --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _use(self, name: str, version: int, op: str) -> AsyncIterator[LoadedModel]:
        """Resolve the version, check it has ``op``, and hold it (and the in-flight gauge) while it runs."""
        m = self.get_model(name, version)
        if op not in m.operations:
            raise Unsupported(
                f"{name} version {m.version} is a {m.model} model ({m.family}) and has no "
                f"{op.replace('_', '-')} operation; it supports: {', '.join(m.operations) or 'nothing'}")
        m.enter()
        if self.metrics is not None:
            self.metrics.track_inflight(name, METHOD[op], 1)
        try:
            yield m
        finally:
            m.leave()
            if self.metrics is not None:
                self.metrics.track_inflight(name, METHOD[op], -1)

    async def sample(self, model: str, version: int, n: int, seed: int, temperature: float | None = None,
                     langevin_steps: int | None = None, langevin_step_size: float | None = None,
                     return_latents: bool = False) -> tuple[np.ndarray, np.ndarray | None, int]:
        """(samples (n, *shape) float32 in the data domain, latents (n, q) or None, served version)."""
        async with self._use(model, version, "sample") as m:
            if not 1 <= int(n) <= self.cfg.max_sample_n:
                raise InvalidInput(f"n = {n}: ask for 1 to {self.cfg.max_sample_n} samples per request")
            noise = _noise(seed)
            options: dict[str, Any] = {}
            if langevin_steps is not None or langevin_step_size is not None:
                if m.family != "energy":
                    raise InvalidInput(f"langevin_steps / langevin_step_size apply to energy-based models; "
                                       f"{model} is a {m.model} model ({m.family}): leave them unset")
                if langevin_steps is not None:
                    if not 1 <= int(langevin_steps) <= self.cfg.max_langevin_steps:
                        raise InvalidInput(f"langevin_steps = {langevin_steps}: use 1 to "
                                           f"{self.cfg.max_langevin_steps}")
                    options["langevin_steps"] = int(langevin_steps)
                if langevin_step_size is not None:
                    step = langevin_step_size
                    if not (math.isfinite(step) and 0 < step <= MAX_LANGEVIN_STEP_SIZE):
                        raise InvalidInput(f"langevin_step_size = {langevin_step_size}: use a number in "
                                           f"(0, {MAX_LANGEVIN_STEP_SIZE:g}]")
                    options["langevin_step_size"] = float(langevin_step_size)
            if temperature is None:
                temperature = float(m.manifest.parameters.get("temperature", 1.0))
            elif not (math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE):
                raise InvalidInput(f"temperature = {temperature}: use a number in (0, {MAX_TEMPERATURE:g}] "
                                   "(1 samples the model as trained)")
            result = await m.program.sample(m.runner(), int(n), noise, float(temperature), **options)
            x = np.asarray(result.x, dtype=np.float32)
            latents = None if not return_latents or result.latents is None else np.asarray(result.latents,
                                                                                             dtype=np.float32)
            if self.metrics is not None:
                self.metrics.add_samples(model, int(n))
            return x, latents, m.version

    async def log_likelihood(self, model: str, version: int, x: np.ndarray, seed: int,
                             importance_samples: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray | None, str, int]:
        """(log p(x) nats (N,) float64, bits/dim (N,) or None when unnormalized, kind, served version)."""
        async with self._use(model, version, "log_likelihood") as m:
            x = self._check_x(m, x)
            noise = _noise(seed)
            options: dict[str, Any] = {}
            if importance_samples is not None:
                if m.family != "latent_variable":
                    raise InvalidInput(f"importance_samples applies to latent-variable models (VAE); {model} "
                                       f"is a {m.model} model ({m.family}): leave it unset")
                if not 1 <= int(importance_samples) <= self.cfg.max_importance_samples:
                    raise InvalidInput(f"importance_samples = {importance_samples}: use 1 to "
                                       f"{self.cfg.max_importance_samples}")
                options["importance_samples"] = int(importance_samples)
            lp = np.asarray(await m.program.log_likelihood(m.runner(), x, noise, **options), dtype=np.float64)
            if lp.shape != (x.shape[0],):
                raise RuntimeError(f"the {m.model} program returned log-likelihoods of shape {lp.shape} for "
                                   f"{x.shape[0]} rows")
            kind = LIKELIHOOD_NAME.get(m.likelihood_kind, "exact")
            bpd = None if kind in ("unnormalized", "none") else -lp / (m.spec.dim * math.log(2))
            if self.metrics is not None:
                self.metrics.add_rows_scored(model, x.shape[0])
            return lp, bpd, kind, m.version

    async def encode(self, model: str, version: int, x: np.ndarray, seed: int,
                     sample: bool = False) -> tuple[np.ndarray, int]:
        """(z (N, latent) float32: posterior mean, or a draw from q(z|x) with ``sample``; served version)."""
        async with self._use(model, version, "encode") as m:
            x = self._check_x(m, x)
            options = self._sample_option(m, "encode", sample)
            z = await m.program.encode(m.runner(), x, _noise(seed), **options)
            return np.asarray(z, dtype=np.float32), m.version

    async def decode(self, model: str, version: int, z: np.ndarray, seed: int,
                     sample: bool = False) -> tuple[np.ndarray, int]:
        """(x (N, *shape) float32 in the data domain: mean of p(x|z), or a draw with ``sample``; version)."""
        async with self._use(model, version, "decode") as m:
            z = self._check_z(m, z)
            options = self._sample_option(m, "decode", sample)
            x = await m.program.decode(m.runner(), z, _noise(seed), **options)
            return np.asarray(x, dtype=np.float32), m.version

    # ---- validation --------------------------------------------------------------------------------
    @staticmethod
    def _sample_option(m: LoadedModel, op: str, sample: bool) -> dict[str, Any]:
        """``{"sample": True}`` where the operation draws from a distribution; a deterministic one refuses it
        rather than answer as if it had drawn."""
        if not sample:
            return {}
        if op not in m.program.sampled:
            which = ", ".join(m.program.sampled) or "none of its operations"
            raise InvalidInput(f"sample: {m.name} is a {m.model} model ({m.family}) whose {op} is a deterministic "
                               f"map with nothing to draw from; leave sample unset (it draws in: {which})")
        return {"sample": True}


    def _check_rows(self, what: str, a: np.ndarray) -> None:
        if a.ndim >= 1 and a.shape[0] > self.cfg.max_rows_per_request:
            raise InvalidInput(f"{what} has {a.shape[0]} rows, more than the limit of "
                               f"{self.cfg.max_rows_per_request} per request; split it into chunks")

    def _check_x(self, m: LoadedModel, x: Any) -> np.ndarray:
        x = np.asarray(x)
        self._check_rows("x", x)
        try:
            m.spec.check(x)
        except ValueError as e:
            shape = ", ".join(map(str, m.spec.shape))
            raise InvalidInput(f"{e} (model {m.name} takes x of shape (N, {shape}), "
                               f"{_domain(m)})") from None
        return x.astype(np.float32)

    def _check_z(self, m: LoadedModel, z: Any) -> np.ndarray:
        z = np.asarray(z)
        self._check_rows("z", z)
        latent = m.manifest.parameters.get("latent_dim")
        shape = (int(latent),) if latent else m.spec.shape
        want = f"(N, {', '.join(map(str, shape))})"
        if z.ndim == len(shape) and tuple(z.shape) == shape:
            raise InvalidInput(f"z has shape {z.shape}: add a batch axis, e.g. shape (1, {shape[0]}...)")
        if tuple(z.shape[1:]) != shape:
            raise InvalidInput(f"z has shape {tuple(z.shape)}, but {m.name} takes latent codes {want}")
        if z.shape[0] == 0:
            raise InvalidInput("z is empty: send at least one row")
        if not np.issubdtype(z.dtype, np.number) or np.issubdtype(z.dtype, np.complexfloating):
            raise InvalidInput(f"z has dtype {z.dtype}; send real numbers (float32)")
        bad = ~np.isfinite(z.reshape(z.shape[0], -1)).all(axis=1)
        if bad.any():
            raise InvalidInput(f"z row {int(np.argmax(bad))} has NaN or infinite values")
        return z.astype(np.float32)


def _noise(seed: int) -> Noise:
    try:
        return Noise(int(seed))
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(str(e)) from None


def _domain(m: LoadedModel) -> str:
    s = m.spec
    if s.discrete:
        return f"integer levels 0..{s.levels - 1}"
    if math.isfinite(s.low) or math.isfinite(s.high):
        return f"real values in [{s.low}, {s.high}]"
    return "finite real values"
