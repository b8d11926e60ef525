"""The engine: model versions from the repository, each family's operations over batched ONNX Runtime calls.

It implements genserve.server.interface.EngineInterface, which every face (server/servicer.py, server/oip.py)
calls through the shared transport layer (server/transport.py); nothing here knows about gRPC. A request
carries the model version its face resolved (``resolve``); ``admit`` checks it against the server's limits,
the data checks validate its tensors against the manifest's data spec, and the family program
(server/programs/) runs with ``run`` bound to the version's per-graph batchers, so every step of every
concurrent request merges into shared ONNX Runtime calls.

Reload swaps a model's table of versions in one assignment: a request holds the version it resolved until it
ends, and a replaced version stops only after its last request finished, so no request in flight fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genserve.core.manifest import LIKELIHOOD_NAME, SERVING_CONFIG, read_serving_config
from genserve.core.noise import Noise
from genserve.server import scoring
from genserve.server.batcher import (
    INLINE_CALL_BOUNDS_S,
    INLINE_HANDOFFS,
    INLINE_IDLE_FACTOR,
    LoopLoad,
    Occupancy,
    handoff_cost,
)
from genserve.server.config import ServerConfig
from genserve.server.errors import EngineError, InvalidInput, NotFound, NotReady, Unsupported
from genserve.server.interface import (
    METHOD,
    DecodeRequest,
    DecodeResult,
    EncodeRequest,
    EncodeResult,
    LikelihoodRequest,
    LikelihoodResult,
    LoadError,
    ModelStatus,
    QueueWaits,
    ReloadResult,
    Request,
    SampleRequest,
    SampleResult,
)
from genserve.server.metrics import BatchStats, Metrics
from genserve.server.programs.base import InvalidOption
from genserve.server.repository import (
    LoadedModel,
    LoadFailed,
    describe_error,
    fingerprint,
    load_version,
    scan,
)

log = logging.getLogger("genserve.server")

MAX_TEMPERATURE = 100.0


class ModelControlError(EngineError):
    """A load or unload the server cannot do: the wrong model control mode, or a model that fails to load."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_CONTROL"


@dataclass
class _Entry:
    """A model's served versions and its failed ones; ``versions`` is replaced whole, never edited."""

    versions: dict[int, LoadedModel] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    loading: bool = False


class Engine:
    """Serves the model repository ``cfg.repo`` (genserve.server.interface.EngineInterface)."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self._caps = {"importance_samples": cfg.max_importance_samples, "langevin_steps": cfg.max_langevin_steps,
                      "draws": cfg.max_dequant_draws}
        """The server's limits on request options (``options``), beyond what each program declares."""
        self.metrics = metrics
        self._models: dict[str, _Entry] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._started = False
        # the request ``admit`` passed last, until an operation takes it (weakly: a request refused after its
        # admission, e.g. for the row budget, is not kept alive)
        self._admitted: weakref.ref[Request] | None = None
        self.inline_call_s = 0.0 if cfg.inline_call_us is None else cfg.inline_call_us / 1e6
        """The batchers' ``inline_call_s``: ``cfg.inline_call_us``, or (unset) measured by ``start``."""
        self.inline_idle_call_s = 0.0 if cfg.inline_idle_call_us is None else cfg.inline_idle_call_us / 1e6
        """The batchers' ``inline_idle_call_s``: ``cfg.inline_idle_call_us``, or (unset) ``INLINE_IDLE_FACTOR``
        times ``inline_call_s``, set by ``start``."""
        self.occupancy: Occupancy | None = None
        """Operations in flight in the whole engine, for the batchers' ``inline_idle_call_us`` rule, made by
        ``start`` when that rule is on; None (not counted per request) while it is off."""
        self.loop_load: LoopLoad | None = None
        """How busy the event loop is, for the batchers' ``busy_delay_factor`` (made by ``start``, on the loop)."""
        self._waits: dict[str, tuple[int, int]] = {}  # model -> (queued submissions, ns waited)
        self._available: set[str] = set()
        """Model folders of the repository at the last scan."""
        self._wanted: set[str] | None = None
        """Explicit model control: the models to serve (loaded at start or by request); None: every model."""

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model version; one that fails is recorded (FAILED + message) and the others serve."""
        if not self.cfg.repo.is_dir():
            raise ValueError(f"model repository {self.cfg.repo} is not a folder; export a model into it with "
                             "`genserve export CHECKPOINT --repo DIR` or pass the right --repo")
        if self.cfg.model_control == "explicit":
            names = self.cfg.load_model_names()
            found = await asyncio.to_thread(scan, self.cfg.repo)
            unknown = sorted(names - set(found) - {"*"})
            if unknown:
                raise ValueError(f"load_models names {', '.join(unknown)}, which the model repository "
                                 f"{self.cfg.repo} does not have (it has: {', '.join(sorted(found)) or 'none'})")
            self._wanted = set(found) if "*" in names else names
        self._executor = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="genserve-ort")
        _start_threads(self._executor, self.cfg.workers)
        if self.cfg.inline_call_us is None:
            handoff = await handoff_cost(self._executor)
            low, high = INLINE_CALL_BOUNDS_S
            self.inline_call_s = min(max(INLINE_HANDOFFS * handoff, low), high)
            log.info("a lone graph call runs on the event loop when such calls take under %.0f us (%d thread "
                     "hand-offs of %.0f us of CPU, measured; set --inline-call-us to choose)",
                     self.inline_call_s * 1e6, INLINE_HANDOFFS, handoff * 1e6)
        if self.cfg.inline_idle_call_us is None:
            self.inline_idle_call_s = INLINE_IDLE_FACTOR * self.inline_call_s  # 0 with --inline-call-us 0
            if self.inline_idle_call_s > 0:
                log.info("a lone graph call runs on the event loop when nothing else is in flight and such calls "
                         "take under %.0f us (%d x the above; set --inline-idle-call-us to choose, 0: never)",
                         self.inline_idle_call_s * 1e6, INLINE_IDLE_FACTOR)
        self.occupancy = Occupancy() if self.inline_idle_call_s > 0 else None
        self.loop_load = LoopLoad() if self.cfg.busy_delay_factor > 1 else None
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
        versions already serving in service; versions gone from disk retire after their requests finish.
        Under explicit model control only the models loaded by request are rescanned."""
        async with self._reload_lock:
            return await self._reload()

    async def load_model(self, name: str) -> ModelStatus:
        """Load (or reload) one model of the repository: explicit model control only. ModelControlError when no
        version of it loads or a version its policy names fails (the versions already serving stay)."""
        self._require_explicit("load", name)
        async with self._reload_lock:
            found = await asyncio.to_thread(scan, self.cfg.repo)
            if name not in found:
                raise NotFound(f"the model repository {self.cfg.repo} has no model folder {name!r}; it has: "
                               f"{', '.join(sorted(found)) or 'none'}")
            assert self._wanted is not None
            self._wanted.add(name)
            result = await self._reload(only={name}, found=found)
        status = self._status(name)
        errors = [e for e in result.errors if e.model == name]
        if errors:
            keep = (f"; versions {', '.join(map(str, status.versions))} keep serving" if status.versions
                    else "; nothing of it serves")
            raise ModelControlError(f"model {name!r} failed to load: " + "; ".join(
                f"version {e.version}: {e.message}" if e.version else e.message for e in errors) + keep)
        return status

    async def unload_model(self, name: str) -> ModelStatus:
        """Unload one model (explicit model control only): it takes no new requests; each version stops once
        its requests in flight have finished."""
        self._require_explicit("unload", name)
        async with self._reload_lock:
            if name not in self._models and name not in self._available:
                raise NotFound(f"no model named {name!r}; the repository has: "
                               f"{', '.join(sorted(self._available | set(self._models))) or 'none'}")
            assert self._wanted is not None
            self._wanted.discard(name)
            entry = self._models.pop(name, None)
            if entry is not None:
                for m in entry.versions.values():
                    self._retire(m)
                self._report_loaded(name, {}, {}, set(entry.versions) | set(entry.errors))
        return self._status(name)

    def _require_explicit(self, what: str, name: str) -> None:
        if self.cfg.model_control != "explicit":
            raise ModelControlError(
                f"cannot {what} model {name!r}: this server's model control mode is {self.cfg.model_control!r}, "
                "which loads every model of the repository (ReloadRepository or SIGHUP rescans it); start the "
                "server with --model-control-mode explicit to load and unload models by request")

    def _status(self, name: str) -> ModelStatus:
        for status in self.list_models():
            if status.name == name:
                return status
        return ModelStatus(name, [], 0, "", "", [], "UNAVAILABLE", "not in the repository")

    async def _reload(self, only: set[str] | None = None,
                      found: dict[str, list[int]] | None = None) -> ReloadResult:
        repo = self.cfg.repo
        if found is None:
            try:
                found = await asyncio.to_thread(scan, repo)
            except OSError as e:
                raise NotReady(f"cannot read the model repository {repo}: {e}") from None
        self._available = set(found)
        wanted = set(found) if self._wanted is None else set(found) & self._wanted
        result = ReloadResult(models=[])
        for name in sorted(wanted | set(self._models)):
            if only is not None and name not in only:
                continue
            entry = self._models.setdefault(name, _Entry())
            old = entry.versions
            new: dict[int, LoadedModel] = {}
            errors: dict[int, str] = {}
            entry.loading = not old
            chosen: list[int] = []
            if name in wanted:
                try:
                    policy = self.cfg.serving.merged(read_serving_config(repo / name / SERVING_CONFIG))
                    chosen, missing = policy.select(found[name])
                    for version in missing:
                        errors[version] = (f"its version_policy names version {version}, which has no folder "
                                           f"{repo / name / str(version)}")
                except ValueError as e:
                    errors[0] = f"{name}: {e}"
                if not found[name]:
                    errors[0] = f"{repo / name} has no version folders (1, 2, ...); export a model into it"
            for version in chosen:
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
                if version in errors and current is not None:
                    new[version] = current  # a changed version that fails keeps its old files serving
            if errors and name in wanted:
                # A load that fails never takes a serving version down: a version the policy now leaves out
                # (a new latest one failed) stays, and if nothing else would serve, so does a version whose
                # folder is gone. Versions removed while others serve still leave.
                new.update({v: m for v, m in old.items() if v not in new and (v in found[name] or not new)})
            result.errors += [LoadError(name, v, msg) for v, msg in sorted(errors.items())]
            old_errors = entry.errors
            entry.versions, entry.errors, entry.loading = new, errors, False  # the atomic swap
            for version, m in old.items():
                if new.get(version) is not m:
                    self._retire(m)
                    if version not in new:
                        result.unloaded.append((name, version))
            self._report_loaded(name, new, errors, set(old) | set(old_errors))
            if name not in wanted:
                del self._models[name]
        result.models = self.list_models()
        return result

    def _load(self, name: str, version: int) -> LoadedModel:
        m = self.metrics
        return load_version(self.cfg.repo, name, version, self.cfg.serving, self.cfg.inter_op_threads,
                            executor=self._executor, observe=self._observe_batch,
                            on_depth=None if m is None else m.set_queue_depth, pad_batches=self.cfg.pad_batches,
                            inline_call_s=self.inline_call_s, occupancy=self.occupancy,
                            inline_idle_call_s=self.inline_idle_call_s, loop_load=self.loop_load,
                            busy_delay_factor=self.cfg.busy_delay_factor)

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
        """Every model: loaded or failed ones, and (explicit model control) the repository's unloaded ones."""
        out = []
        for name in sorted(self._models.keys() | self._available):
            entry = self._models.get(name)
            if entry is None:
                out.append(ModelStatus(name=name, versions=[], default_version=0, family="", model="",
                                       operations=[], state="UNAVAILABLE",
                                       message="in the repository, not loaded (explicit model control)"))
                continue
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
            if name in self._available:
                raise NotFound(f"model {name!r} is in the repository but not loaded (model control is explicit); "
                               "load it with LoadModel, RepositoryModelLoad or POST "
                               f"/v2/repository/models/{name}/load")
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

    def resolve(self, name: str, version: int, operation: str) -> LoadedModel:
        """The version a request runs on: ``get_model`` and a check that it has ``operation``."""
        m = self.get_model(name, version)
        _check_operation(m, operation)
        return m

    def queue_waits(self, model: str) -> QueueWaits:
        """Submissions of ``model`` (all versions, every graph) that waited in batch queues, and their waits."""
        count, ns = self._waits.get(model, (0, 0))
        return QueueWaits(count, ns)

    def _observe_batch(self, stats: BatchStats) -> None:
        """Every batcher's call: the engine's own queue counters (OIP statistics), then Prometheus."""
        count, ns = self._waits.get(stats.model, (0, 0))
        self._waits[stats.model] = (count + len(stats.queue_waits),
                                    ns + round(sum(stats.queue_waits) * 1e9))
        if self.metrics is not None:
            self.metrics.observe_batch(stats)

    # ---- limits --------------------------------------------------------------------------------------
    def admit(self, request: Request) -> None:
        """Every limit a request must keep, checked here and only here (InvalidInput naming the field). A face
        that admits a request before it holds rows for it hands the same request object to the operation,
        which then does not check it again (``_enter``)."""
        self._limits(request)
        self._admitted = weakref.ref(request)

    def _limits(self, request: Request) -> None:
        cfg = self.cfg
        if isinstance(request, SampleRequest):
            n = request.n
            if n < 1:
                raise InvalidInput(f"{n} samples asked for; ask for at least 1", "n")
            if n > cfg.max_sample_n:
                raise InvalidInput(f"{n} samples asked for, more than this server's limit of {cfg.max_sample_n}; "
                                   "ask for fewer per request", "n")
            t = request.temperature
            if t is not None and not (math.isfinite(t) and 0 < t <= MAX_TEMPERATURE):
                raise InvalidInput(f"{t} is outside (0, {MAX_TEMPERATURE:g}]; use a number in that range (1 "
                                   "samples the model as trained)", "temperature")
            self.options(request)
            return
        if isinstance(request, DecodeRequest):
            self._check_rows("z", request.z, "split it into requests of at most that many rows")
        elif isinstance(request, EncodeRequest):
            self._check_rows("x", request.x, "split it into requests of at most that many rows")
        else:
            self._check_rows("x", request.x, "split it, or use LogLikelihoodStream to score a data set in chunks")
            if request.scores or request.percentile or request.per_dimension:
                scoring.check(request.model, tuple(request.scores), request.percentile, request.per_dimension)
        self.options(request)

    def options(self, request: Request) -> dict[str, Any]:
        """The request's options, checked against what its model's program declares and typed; InvalidInput
        naming an option that does not apply to this model or is out of range (server limits included)."""
        given: dict[str, Any] = {}
        if isinstance(request, SampleRequest):
            if request.langevin_steps is not None:
                given["langevin_steps"] = request.langevin_steps
            if request.langevin_step_size is not None:
                given["langevin_step_size"] = request.langevin_step_size
        elif isinstance(request, LikelihoodRequest):
            if request.importance_samples is not None:
                given["importance_samples"] = request.importance_samples
            if request.draws is not None:
                given["draws"] = request.draws
        elif request.sample:
            given["sample"] = True
        if not given:
            return given
        m = request.model
        try:
            return m.program.check_options(request.operation, given, self._caps,
                                           f"{m.name}, a {m.model} model ({m.family})")
        except InvalidOption as e:
            raise InvalidInput(str(e), e.field) from None

    def _check_rows(self, field: str, a: np.ndarray, fix: str) -> None:
        if a.ndim >= 1 and a.shape[0] > self.cfg.max_rows_per_request:
            raise InvalidInput(f"has {a.shape[0]} rows, more than the limit of {self.cfg.max_rows_per_request} "
                               f"per request; {fix}", field)

    # ---- operations --------------------------------------------------------------------------------
    def _enter(self, request: Request) -> LoadedModel:
        """Check the request, then hold its version (and the in-flight gauge) until ``_leave``: every operation
        is ``m = self._enter(request)``, then its work in a ``try`` whose ``finally`` is ``self._leave(m, op)``
        (plain calls rather than a context manager: this runs twice per request, on the event loop)."""
        admitted = self._admitted
        if admitted is not None and admitted() is request:  # admitted a moment ago by the face (requests are
            self._admitted = None                           # frozen): not again
        else:
            self._limits(request)
        m = request.model
        if m.active == 0:
            entry = self._models.get(m.name)
            if entry is None or entry.versions.get(m.version) is not m:
                # replaced by a reload and idle, so it may be retiring: run on what serves that version now
                m = self.get_model(m.name, m.version)
        op = request.operation
        _check_operation(m, op)
        m.enter()
        occupancy = self.occupancy
        if occupancy is not None:
            occupancy.enter()
        if self.metrics is not None:
            self.metrics.track_inflight(m.name, METHOD[op], 1)
        return m

    def _leave(self, m: LoadedModel, op: str) -> None:
        m.leave()
        if self.occupancy is not None:
            self.occupancy.leave()
        if self.metrics is not None:
            self.metrics.track_inflight(m.name, METHOD[op], -1)

    async def sample(self, request: SampleRequest) -> SampleResult:
        """Samples in the data domain, latents when asked for and the family has them, served version."""
        m = self._enter(request)
        try:
            noise = _noise(request.seed)
            options = self.options(request)
            temperature = request.temperature
            if temperature is None:
                temperature = float(m.manifest.parameters.get("temperature", 1.0))
            n = int(request.n)
            result = await m.program.sample(m.runner(), n, noise, float(temperature), **options)
            x = np.asarray(result.x, dtype=np.float32)
            latents = (None if not request.return_latents or result.latents is None
                       else np.asarray(result.latents, dtype=np.float32))
            if self.metrics is not None:
                self.metrics.add_samples(m.name, n)
            return SampleResult(x, latents, m.version)
        finally:
            self._leave(m, request.operation)

    async def log_likelihood(self, request: LikelihoodRequest) -> LikelihoodResult:
        """log p(x) in nats, bits/dim (None when unnormalized), the likelihood kind, served version; and,
        when asked, score kinds, percentiles among the calibration data and per-dimension terms."""
        m = self._enter(request)
        try:
            x = self._check_x(m, request.x)
            noise = _noise(request.seed)
            options = self.options(request)
            terms = None
            if request.per_dimension:  # admitted: the program has log_likelihood_terms
                lp, terms = await m.program.log_likelihood_terms(m.runner(), x, noise, **options)
                terms = np.asarray(terms, dtype=np.float64).reshape(x.shape)
            else:
                lp = await m.program.log_likelihood(m.runner(), x, noise, **options)
            lp = np.asarray(lp, dtype=np.float64)
            if lp.shape != (x.shape[0],):
                raise RuntimeError(f"the {m.model} program returned log-likelihoods of shape {lp.shape} for "
                                   f"{x.shape[0]} rows")
            kind = LIKELIHOOD_NAME.get(m.likelihood_kind, "exact")
            bpd = None if kind in ("unnormalized", "none") else -lp / (m.spec.dim * math.log(2))
            if self.metrics is not None:
                self.metrics.add_rows_scored(m.name, x.shape[0])
            if not (request.scores or request.percentile or terms is not None):
                return LikelihoodResult(lp, bpd, kind, m.version)
            scores = scoring.compute_scores(m, x, lp, tuple(request.scores)) if request.scores else {}
            pct = scoring.percentiles(m.manifest, {scoring.LOG_PROB: lp, **scores}) if request.percentile else {}
            return LikelihoodResult(lp, bpd, kind, m.version, scores, pct, terms)
        finally:
            self._leave(m, request.operation)

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        """z (N, latent) float32: the posterior mean, or a draw from q(z|x) with ``sample``; served version."""
        m = self._enter(request)
        try:
            x = self._check_x(m, request.x)
            options = self.options(request)
            z = await m.program.encode(m.runner(), x, _noise(request.seed), **options)
            return EncodeResult(np.asarray(z, dtype=np.float32), m.version)
        finally:
            self._leave(m, request.operation)

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        """x (N, *shape) float32 in the data domain: the mean of p(x|z), or a draw with ``sample``; version."""
        m = self._enter(request)
        try:
            z = self._check_z(m, request.z)
            options = self.options(request)
            x = await m.program.decode(m.runner(), z, _noise(request.seed), **options)
            return DecodeResult(np.asarray(x, dtype=np.float32), m.version)
        finally:
            self._leave(m, request.operation)

    # ---- data checks -------------------------------------------------------------------------------
    @staticmethod
    def _check_x(m: LoadedModel, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        try:
            m.spec.check(x)
        except ValueError as e:
            shape = ", ".join(map(str, m.spec.shape))
            raise InvalidInput(f"{e} (model {m.name} takes x of shape (N, {shape}), "
                               f"{_domain(m)})") from None
        return x.astype(np.float32)

    @staticmethod
    def _check_z(m: LoadedModel, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z)
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
            raise InvalidInput(f"z row {int(np.argmax(bad))} has NaN or infinite values; send finite latent "
                               "codes (e.g. draws from the prior N(0, I))")
        return z.astype(np.float32)


def _start_threads(executor: ThreadPoolExecutor, n: int) -> None:
    """Start the pool's ``n`` threads now (a pool starts them on demand): the first requests after start
    would otherwise each pay for a thread's creation."""
    barrier = threading.Barrier(n)
    for f in [executor.submit(barrier.wait, 60) for _ in range(n)]:
        f.result()


def _check_operation(m: LoadedModel, op: str) -> None:
    if op not in m.operations:
        raise Unsupported(
            f"{m.name} version {m.version} is a {m.model} model ({m.family}) and has no "
            f"{op.replace('_', '-')} operation; it supports: {', '.join(m.operations) or 'nothing'}")


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
