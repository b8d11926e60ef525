"""The model repository: scan folders, check manifests and graph hashes, open sessions, build batchers.

Layout (genserve.core.manifest): ``REPO/NAME/config.json`` (optional ServingConfig) and
``REPO/NAME/VERSION/manifest.json`` with one .onnx file per graph (a mixture's members' graphs too, named
"m<k>/<graph>", each with its own batcher; its program is built from the manifest's members,
server/programs/mixture.py). The folder names decide a version's model name and number (the manifest's are
informational, so a copied folder serves under its new number); which versions serve is config.json's
version_policy (default all, see server/engine.py); a version that fails to load is reported with a message
and the others load. A version is warmed up before it serves (``warm_up``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from genserve.core.manifest import (
    MANIFEST,
    OPERATION_NAME,
    SERVING_CONFIG,
    read_manifest,
    read_serving_config,
    spec_from_proto,
)
from genserve.core.spec import DataSpec
from genserve.server.batcher import Batcher, Feeds, LoopLoad, Occupancy, pad_buckets
from genserve.server.config import ServingSettings
from genserve.server.metrics import BatchStats
from genserve.server.programs import program_from_manifest
from genserve.server.programs.base import Program, Run
from genserve.server.scoring import check_fitted
from genserve.server.sessions import SessionOptions, make_session, run_session, uses_cuda
from genserve.v1 import manifest_pb2 as pb

log = logging.getLogger("genserve.server")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]*$")


class LoadFailed(ValueError):
    """A model version that cannot be served; the message says what is wrong and how to fix it."""


def scan(repo: Path) -> dict[str, list[int]]:
    """Model folders and their whole-number version folders, ascending; other entries are ignored."""
    out: dict[str, list[int]] = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
        out[d.name] = sorted(int(v.name) for v in d.iterdir() if v.is_dir() and VERSION_RE.match(v.name))
    return out


def fingerprint(repo: Path, name: str, version: int) -> str:
    """Changes when the version's manifest, its graph files or the model's config.json change."""
    h = hashlib.sha256()
    folder = repo / name / str(version)
    for path in [repo / name / SERVING_CONFIG, *sorted(folder.iterdir())]:
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(eq=False)
class LoadedModel:
    """One loaded model version: what the engine serves and the transport describes."""

    name: str
    version: int
    manifest: pb.ModelManifest
    spec: DataSpec
    serving: ServingSettings
    """Effective settings: config.json over the manifest's over the server defaults."""
    providers: list[str]
    """Execution providers the sessions actually run on, e.g. ["CPUExecutionProvider"]."""
    program: Program
    batchers: dict[str, Batcher]
    operations: tuple[str, ...]
    fingerprint: str = ""
    warmup_calls: dict[str, int] = field(default_factory=dict)
    """ONNX Runtime calls per graph that the warm-up made before the version served (empty: no warm-up)."""
    sessions: dict[str, int] = field(default_factory=dict)
    """ONNX Runtime sessions opened per graph: 1 however many instances share it on the CPU, else one each."""
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Values derived from this version alone, cached by whoever derives them (the OIP tensor specs of an
    operation, read by every request): a reload makes a new LoadedModel, so they never go stale."""
    active: int = 0
    """Operations running on this version now; a retired version stops once it reaches 0."""
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def likelihood_kind(self) -> int:
        return self.manifest.capabilities.likelihood

    def runner(self) -> Run:
        """A ``run`` for one operation's program: through the graphs' dynamic batchers, its first submission
        fresh (it may wait for company) and the later ones its continuation steps."""
        first = True

        async def run(graph: str, feeds: Feeds) -> Feeds:
            nonlocal first
            batcher = self.batchers.get(graph)
            if batcher is None:
                raise RuntimeError(f"the {self.model} program asked for graph {graph!r}, which {self.name} "
                                   f"version {self.version} does not have (it has {sorted(self.batchers)}); "
                                   "re-export the model")
            fresh, first = first, False
            return await batcher.submit(feeds, fresh=fresh)

        return run

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def retire(self) -> None:
        """Wait for the operations in flight on this version, then stop its batchers (sessions are freed)."""
        await self._idle.wait()
        for b in self.batchers.values():
            await b.stop(drain=True)


def load_version(repo: Path, name: str, version: int, defaults: ServingSettings, inter_op_threads: int,
                 executor: Executor | None = None, observe: Callable[[BatchStats], None] | None = None,
                 on_depth: Callable[[str, str, int], None] | None = None, pad_batches: str = "auto",
                 inline_call_s: float = 0.0, occupancy: Occupancy | None = None,
                 inline_idle_call_s: float = 0.0, loop_load: LoopLoad | None = None,
                 busy_delay_factor: float = 1.0) -> LoadedModel:
    """Load ``repo/name/version`` (blocking: reads files, hashes graphs, opens sessions); else LoadFailed."""
    folder = repo / name / str(version)
    where = f"{name} version {version}"
    try:
        manifest = read_manifest(folder / MANIFEST)
    except ValueError as e:
        raise LoadFailed(str(e)) from None
    if manifest.name != name or manifest.version != version:
        # The folders decide, as in Triton's repository: copying model/1 to model/2 (or to a new model folder)
        # serves the copy as version 2 without renumbering its manifest. What the export wrote is kept in the log.
        log.info("%s: the manifest says %s version %d; serving it as %s version %d (the folders decide)",
                 folder / MANIFEST, manifest.name, manifest.version, name, version)
        manifest.name, manifest.version = name, version
    try:
        spec = spec_from_proto(manifest.data)
        own = read_serving_config(repo / name / SERVING_CONFIG)
        settings = defaults.merged(own, manifest.serving)
        check_fitted(manifest, spec)
    except ValueError as e:
        raise LoadFailed(f"{where}: {e}") from None
    for source, layer in ((repo / name / SERVING_CONFIG, own), (folder / MANIFEST, manifest.serving)):
        for key, value, server_wide in defaults.overridden(layer):
            if layer is manifest.serving and own.HasField(key):
                continue  # config.json's own value is the one in effect (and was named above)
            log.info("%s: %s sets %s = %s, which wins over the server-wide %s (per-model settings win, as in "
                     "Triton); edit that file to change it", where, source, key, value, server_wide)
    try:
        program = program_from_manifest(manifest)
    except (ValueError, ImportError, AttributeError) as e:
        raise LoadFailed(f"{where}: {e}") from None
    operations = tuple(OPERATION_NAME[op] for op in manifest.operations if op in OPERATION_NAME)
    missing = [op for op in operations if op not in program.operations]
    if missing:
        raise LoadFailed(f"{where}: the manifest lists {missing}, which the {manifest.family} serving program "
                         f"does not implement (it has {list(program.operations)}); re-export the model")
    if not manifest.graphs:
        raise LoadFailed(f"{where}: the manifest lists no graphs; re-export the model")

    opts = SessionOptions(provider=settings.provider, intra_op_threads=settings.intra_op_threads,
                          inter_op_threads=inter_op_threads)
    batchers: dict[str, Batcher] = {}
    runners: dict[str, Callable[[int, Feeds], Feeds]] = {}
    providers: list[str] = []
    opened: dict[str, int] = {}
    for g in manifest.graphs:
        sessions = [_open_graph(folder, g, opts, settings, where)]
        # ONNX Runtime's Run is thread-safe: on the CPU with one intra-op thread (each call then runs on its
        # caller's thread alone), the instances share one session, so more of them cost no more memory for the
        # weights; on CUDA (a stream each) or with an intra-op pool (threads each) every instance opens its own.
        shared = not uses_cuda(sessions[0]) and settings.intra_op_threads == 1
        if settings.instances == 0:  # auto: resolved once, on the first graph (every graph has the provider)
            settings = replace(settings, instances=auto_instances(shared))
        sessions += [sessions[0] if shared else _open_graph(folder, g, opts, settings, where)
                     for _ in range(settings.instances - 1)]
        runners[g.name] = _runner(sessions)
        opened[g.name] = len({id(session) for session in sessions})
        providers = providers or list(sessions[0].get_providers())
        check_signature(sessions[0], g, where)
        shapes = {i.name: tuple(None if d < 0 else d for d in i.shape[1:]) for i in g.inputs}
        batchers[g.name] = Batcher(
            g.name, runners[g.name], max_batch_size=settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms, max_queue_size=settings.max_queue_size,
            instances=settings.instances, executor=executor, input_shapes=shapes, model=name, observe=observe,
            on_depth=None if on_depth is None else (lambda rows, g=g.name: on_depth(name, g, rows)),
            pad_to=settings.max_batch_size if pad_batches == "on" else 0,
            pad_sizes=pad_buckets(settings.max_batch_size) if pad_batches == "buckets" or (
                pad_batches == "auto" and uses_cuda(sessions[0])) else (), inline_call_s=inline_call_s,
            occupancy=occupancy, inline_idle_call_s=inline_idle_call_s, loop_load=loop_load,
            busy_delay_factor=busy_delay_factor,
            cost_clock=time.thread_time if settings.intra_op_threads == 1 and not uses_cuda(sessions[0]) else None)
    warmup_calls = warm_up(program, manifest, spec, operations, runners, settings, where) if settings.warmup else {}
    loaded = LoadedModel(name=name, version=version, manifest=manifest, spec=spec, serving=settings,
                         providers=providers, program=program, batchers=batchers, operations=operations,
                         fingerprint=fingerprint(repo, name, version), warmup_calls=warmup_calls,
                         sessions=opened)
    for b in batchers.values():  # no request in flight can join a batch beyond the version's active ones
        b.expected = lambda: loaded.active
        b.early = settings.adaptive_batching
    return loaded


WARMUP_ROWS = 64
"""Rows of the warm-up's full-batch call of each graph (at most max_batch_size)."""


def auto_instances(shared: bool) -> int:
    """The instance count of ``instances = 0`` (auto): 2 where the instances share one session (the CPU with one
    intra-op thread: no memory for a second copy of the weights) and this process may run on 2 or more cores,
    else 1. A second instance overlaps a large batch's call with the event loop's work for the requests around
    it (64-row requests at 8 and 64 clients: 1.15x to 1.19x the requests/s of one); the batcher never starts a
    second call for a batch under ``SPLIT_MIN_ROWS`` rows, so small requests run as with one. ``--processes N``
    is not counted on purpose: the kernel spreads connections, not requests, over the processes, so one client
    connection puts all its load on one process, which then needs both instances (BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if shared and cores >= 2 else 1


def warm_up(program: Program, manifest: pb.ModelManifest, spec: DataSpec, operations: tuple[str, ...],
            runners: dict[str, Callable[[int, Feeds], Feeds]], settings: ServingSettings,
            where: str) -> dict[str, int]:
    """Run every operation once on one row (seed 0, default options), then every graph on every instance at
    WARMUP_ROWS rows, so ONNX Runtime's first-call allocations and the program's first pass happen at load,
    not in the first request. Blocking (the loading thread); returns the calls per graph; LoadFailed when the
    model fails its warm-up."""
    from genserve.core.noise import Noise  # noqa: PLC0415 - only loading needs it

    calls = dict.fromkeys(runners, 0)

    def call(graph: str, instance: int, feeds: Feeds) -> Feeds:
        calls[graph] += 1
        return runners[graph](instance, feeds)

    async def run(graph: str, feeds: Feeds) -> Feeds:
        return call(graph, 0, feeds)

    async def every_operation() -> None:
        for op in operations:
            if op == "sample":
                await program.sample(run, 1, Noise(0), temperature)
            elif op == "log_likelihood":
                await program.log_likelihood(run, x, Noise(0))
            elif op == "encode":
                await program.encode(run, x, Noise(0))
            elif op == "decode":
                await program.decode(run, z, Noise(0))

    try:  # the inputs too: a manifest's latent_dim or temperature may be what fails (a negative latent_dim)
        value = min(max(0.0, spec.low), spec.high)
        x = np.full((1, *spec.shape), value, np.float32)
        latent = manifest.parameters.get("latent_dim")
        z = np.zeros((1, int(latent)) if latent else (1, *spec.shape), np.float32)
        temperature = float(manifest.parameters.get("temperature", 1.0))
        asyncio.run(every_operation())
        rows = min(WARMUP_ROWS, settings.max_batch_size)
        for g in manifest.graphs:
            dims = [list(t.shape[1:]) for t in g.inputs]
            if any(d < 0 for shape in dims for d in shape):
                continue  # another dynamic axis: the operations above warmed it at the sizes they use
            feeds = {t.name: np.zeros((rows, *shape), np.float32) for t, shape in zip(g.inputs, dims, strict=True)}
            for instance in range(settings.instances):
                call(g.name, instance, feeds)
    except Exception as e:  # noqa: BLE001 - ORT and the programs raise their own types
        raise LoadFailed(f"{where}: warm-up failed ({describe_error(e)}); the version does not serve; set "
                         '"warmup": false in config.json to load it without one') from None
    return calls


def check_signature(session: ort.InferenceSession, g: pb.GraphSpec, where: str) -> None:
    """The graph file takes the inputs and gives the outputs its manifest entry names, with the same ranks and
    fixed sizes; else LoadFailed now, rather than an INTERNAL error on the first request that uses it."""
    for kind, actual, declared in (("inputs", session.get_inputs(), g.inputs),
                                   ("outputs", session.get_outputs(), g.outputs)):
        got = {a.name: a.shape for a in actual}
        if kind == "inputs" and sorted(got) != sorted(t.name for t in declared):
            raise LoadFailed(f"{where}: graph {g.name!r} has inputs {sorted(got)} but the manifest says "
                             f"{sorted(t.name for t in declared)}; re-export the model")
        for t in declared:
            if t.name not in got:
                raise LoadFailed(f"{where}: graph {g.name!r} has no {kind[:-1]} {t.name!r} (it has "
                                 f"{sorted(got)}), which the manifest lists; re-export the model")
            shape = got[t.name]
            fixed = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
            clash = len(fixed) != len(t.shape) or any(a != b and -1 not in (a, b)
                                                      for a, b in zip(fixed, t.shape, strict=False))
            if clash:
                raise LoadFailed(f"{where}: graph {g.name!r} {kind[:-1]} {t.name!r} has shape {list(shape)} in "
                                 f"{g.file} but {list(t.shape)} in the manifest; re-export the model")


def _open_graph(folder: Path, g: pb.GraphSpec, opts: SessionOptions, settings: ServingSettings,
                where: str) -> ort.InferenceSession:
    """A session for graph ``g``, its file's sha256 checked first (the fp16 variant when asked, on CUDA)."""
    session = _session(folder, g.name, g.file, g.sha256, opts, where)
    if settings.fp16 and g.fp16_file and uses_cuda(session):
        session = _session(folder, g.name, g.fp16_file, g.fp16_sha256, opts, where)
    return session


def _session(folder: Path, graph: str, file: str, sha256: str, opts: SessionOptions,
             where: str) -> ort.InferenceSession:
    path = (folder / file).resolve()
    if folder.resolve() not in path.parents:
        raise LoadFailed(f"{where}: graph {graph!r} file {file!r} lies outside the version folder")
    if not path.is_file():
        raise LoadFailed(f"{where}: graph {graph!r} file {file} is missing; re-export the model")
    if not sha256:
        raise LoadFailed(f"{where}: the manifest gives no sha256 for {file}; re-export the model")
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise LoadFailed(f"{where}: {file}: sha256 mismatch (manifest {sha256[:12]}..., file "
                         f"{actual[:12]}...); it changed or was damaged after export; re-export the model")
    try:
        session = make_session(path, opts)
        for arg in (*session.get_inputs(), *session.get_outputs()):  # what the load reads next: a damaged file
            _ = arg.name, arg.shape, arg.type                        # can hold names that are not UTF-8
        return session
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for bad graphs
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise LoadFailed(f"{where}: ONNX Runtime cannot load {file}: {first}") from None


def _runner(sessions: list[ort.InferenceSession]) -> Callable[[int, Feeds], Feeds]:
    # Output names and provider read once: each call runs in a worker thread holding the GIL for these
    # lookups, time the event loop then waits for.
    outputs = [[o.name for o in s.get_outputs()] for s in sessions]
    cuda = [uses_cuda(s) for s in sessions]

    def run(instance: int, feeds: Feeds) -> Feeds:
        return run_session(sessions[instance], feeds, outputs[instance], cuda[instance])

    return run


def describe_error(e: BaseException) -> str:
    """A one-line message for an unexpected load failure."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


