"""The engine in-process on the fixture repository: every family's operations against the export station's
reference (the program over DirectRunner), batching that changes no answer, validation, reload, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from waiting import until

from genserve.core.manifest import OPERATION, read_manifest, spec_from_proto, write_manifest
from genserve.core.noise import Noise
from genserve.server.config import ServerConfig
from genserve.server.engine import Engine
from genserve.server.errors import InvalidInput, NotFound, NotReady, Unsupported
from genserve.server.interface import DecodeRequest, EncodeRequest, LikelihoodRequest, SampleRequest
from genserve.server.metrics import Metrics
from genserve.server.programs import program_from_manifest
from genserve.server.sessions import DirectRunner, SessionOptions

ROWS = 6
AR_FIRST = ("digits-arrnn", "digits-arcnn")  # multi-step samplers show step merging best; the RNN step is cheap


class Reference:
    """The export station's reference for one model version: its program over unbatched ONNX Runtime calls."""

    def __init__(self, folder: Path) -> None:
        self.manifest = read_manifest(folder / "manifest.json")
        self.spec = spec_from_proto(self.manifest.data)
        self.program = program_from_manifest(self.manifest)
        self.runner = DirectRunner.from_files({g.name: folder / g.file for g in self.manifest.graphs},
                                              SessionOptions(provider="cpu"))
        self.operations = [op for op, v in OPERATION.items() if v in self.manifest.operations]

    def run(self, op: str, *args, **kw):
        return asyncio.run(getattr(self.program, op)(self.runner, *args, **kw))

    def latents(self, rows: int, seed: int = 0) -> np.ndarray:
        latent = self.manifest.parameters.get("latent_dim")
        shape = (int(latent),) if latent else self.spec.shape
        return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(np.float32)

    def data(self, rows: int, seed: int = 0) -> np.ndarray:
        """Rows in the data domain: the model's own samples where it samples, else random levels/values."""
        if "sample" in self.operations:
            return self.run("sample", rows, Noise(seed)).x
        rng = np.random.default_rng(seed)
        if self.spec.discrete:
            return rng.integers(0, self.spec.levels, (rows, *self.spec.shape)).astype(np.float32)
        return rng.standard_normal((rows, *self.spec.shape)).astype(np.float32)


def newest(repo: Path, name: str) -> Path:
    return max((v for v in (repo / name).iterdir() if v.name.isdigit()), key=lambda v: int(v.name))


def running(cfg: ServerConfig, body, metrics: Metrics | None = None):
    """Start an engine, run ``await body(engine)``, stop it; returns body's result."""
    async def main():
        engine = Engine(cfg, metrics or Metrics())
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def sample(engine: Engine, name: str, n: int, seed: int, version: int = 0, **options):
    """Engine.sample on ``name`` resolved once, as a face does (options: SampleRequest's fields)."""
    return await engine.sample(SampleRequest(engine.resolve(name, version, "sample"), n, seed, **options))


async def score(engine: Engine, name: str, x, seed: int, importance_samples: int | None = None):
    model = engine.resolve(name, 0, "log_likelihood")
    return await engine.log_likelihood(LikelihoodRequest(model, x, seed, importance_samples))


async def encode(engine: Engine, name: str, x, seed: int, draw: bool = False):
    return await engine.encode(EncodeRequest(engine.resolve(name, 0, "encode"), x, seed, draw))


async def decode(engine: Engine, name: str, z, seed: int, draw: bool = False):
    return await engine.decode(DecodeRequest(engine.resolve(name, 0, "decode"), z, seed, draw))


def equal(a, b) -> bool:
    return a is None and b is None or (np.shape(a) == np.shape(b) and np.array_equal(a, b))


def set_serving(repo: Path, name: str, **settings) -> None:
    """Write the model's config.json (it overrides the server defaults)."""
    path = repo / name / "config.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **settings}))


# ---- every operation of every family ------------------------------------------------------------------------------

def test_every_operation_of_every_family_gives_the_reference_numbers(engine_config, repo_dir, repo_models) -> None:
    refs = {name: Reference(newest(repo_dir, name)) for name in repo_models}
    expected, calls = {}, []
    for name, ref in refs.items():
        x = ref.data(ROWS, seed=1)
        for op in ref.operations:
            if op == "sample":
                t = float(ref.manifest.parameters.get("temperature", 1.0))
                r = ref.run("sample", ROWS, Noise(11), t)
                expected[name, op] = (r.x, r.latents)
                calls.append((name, op, lambda e, n=name: sample(e, n, ROWS, 11, return_latents=True)))
            elif op == "log_likelihood":
                expected[name, op] = np.asarray(ref.run("log_likelihood", x, Noise(12)), np.float64)
                calls.append((name, op, lambda e, n=name, x=x: score(e, n, x, 12)))
            elif op == "encode":
                expected[name, op] = ref.run("encode", x, Noise(13))
                calls.append((name, op, lambda e, n=name, x=x: encode(e, n, x, 13)))
            elif op == "decode":
                z = ref.latents(ROWS, seed=2)
                expected[name, op] = ref.run("decode", z, Noise(14))
                calls.append((name, op, lambda e, n=name, z=z: decode(e, n, z, 14)))

    async def body(engine):  # all at once: different models and operations share the event loop and pool
        return await asyncio.gather(*(call(engine) for _, _, call in calls))

    results = running(engine_config, body)
    assert len(calls) >= 2 * len(repo_models)
    for (name, op, _), got in zip(calls, results, strict=True):
        want = expected[name, op]
        version = int(newest(repo_dir, name).name)
        if op == "sample":
            x, latents, v = got
            assert equal(x, want[0]) and v == version, f"{name} {op}"
            assert want[1] is None or equal(latents, want[1]), f"{name} {op} latents"
        elif op == "log_likelihood":
            lp, bpd, kind, v = got
            assert equal(lp, want) and lp.dtype == np.float64, f"{name} {op}"
            assert kind in ("exact", "lower_bound", "unnormalized")
            dim = refs[name].spec.dim
            assert bpd is None if kind == "unnormalized" else np.allclose(bpd, -want / (dim * np.log(2)))
        else:
            assert equal(got[0], want) and got[1] == version, f"{name} {op}"


# ---- batching changes no answer -----------------------------------------------------------------------------------

def test_64_concurrent_samples_merge_their_steps_and_each_equals_its_solo_run(engine_config, repo_dir,
                                                                             repo_models) -> None:
    """64 one-sample requests run together; each equals the same request run alone (unbatched ONNX Runtime
    calls through the reference, and for a few, alone through the engine)."""
    name = next((m for m in AR_FIRST if m in repo_models), "digits-ppca")
    ref = Reference(newest(repo_dir, name))
    metrics = Metrics()

    async def body(engine):
        merged = await asyncio.gather(*(sample(engine, name, 1, seed)
                                        for seed in range(64)))
        graphs = list(engine.get_model(name).batchers)
        count = sum(metrics.value("genserve_batch_size_rows_count", {"model": name, "graph": g}) or 0 for g in graphs)
        total = sum(metrics.value("genserve_batch_size_rows_sum", {"model": name, "graph": g}) or 0 for g in graphs)
        alone = [await sample(engine, name, 1, seed) for seed in (0, 17, 63)]
        return merged, alone, count, total

    merged, alone, count, total = running(engine_config, body, metrics)
    solo = [ref.run("sample", 1, Noise(seed)).x for seed in range(64)]
    assert all(equal(m[0], s) for m, s in zip(merged, solo, strict=True))
    assert all(equal(a[0], merged[seed][0]) for a, seed in zip(alone, (0, 17, 63), strict=True))
    assert total / count > 8, f"mean batch {total / count:.1f} rows: the 64 requests' steps did not merge"
    assert len({m[0].tobytes() for m in merged}) > 32  # different seeds, different samples


def test_concurrent_scores_of_every_family_equal_their_solo_runs(engine_config, repo_dir, repo_models) -> None:
    """16 concurrent 1-row LogLikelihood (and Encode) requests per model against the same requests one by one."""
    data = {n: Reference(newest(repo_dir, n)).data(16, seed=5) for n in repo_models}

    async def body(engine):
        out = {}
        for name in repo_models:
            ops = engine.get_model(name).operations
            for op in ("log_likelihood", "encode"):
                if op not in ops:
                    continue
                call = score if op == "log_likelihood" else encode
                merged = await asyncio.gather(*(call(engine, name, data[name][i:i + 1], i) for i in range(16)))
                solo = [await call(engine, name, data[name][i:i + 1], i) for i in range(16)]
                out[name, op] = merged, solo
        return out

    results = running(engine_config, body)
    assert results
    for (name, op), (merged, solo) in results.items():
        assert all(equal(m[0], s[0]) for m, s in zip(merged, solo, strict=True)), f"{name} {op}"


@pytest.mark.parametrize(("threads", "sessions"), [(1, 1), (2, 3)])
def test_instances_share_one_session_on_the_cpu_with_one_thread_and_answer_as_one_instance(
        engine_config, repo_copy, threads, sessions) -> None:
    """Three instances: with one intra-op thread they run concurrent calls on one shared session (ONNX Runtime's
    Run is thread-safe), with an intra-op pool each opens its own; either way 64-row requests split over the
    instances, running at once, give the numbers of the same requests one by one."""
    name = "digits-realnvp"
    set_serving(repo_copy, name, instances=3, intra_op_threads=threads, max_batch_size=64)
    x = Reference(newest(repo_copy, name)).data(64 * 6, seed=3)

    async def body(engine):
        model = engine.get_model(name)
        opened = dict(model.sessions)
        merged = await asyncio.gather(*(encode(engine, name, x[i:i + 64], i) for i in range(0, len(x), 64)))
        solo = [await encode(engine, name, x[i:i + 64], i) for i in range(0, len(x), 64)]
        return opened, merged, solo, sum(b.calls for b in model.batchers.values())

    opened, merged, solo, calls = running(replace(engine_config, repo=repo_copy), body)
    assert opened and set(opened.values()) == {sessions}, opened
    assert calls >= 12  # each request its own 64-row call, six of them at once over three instances
    assert all(equal(m[0], s[0]) for m, s in zip(merged, solo, strict=True))


@pytest.mark.parametrize(("threads", "config_json", "want"), [(1, None, "auto"), (2, None, 1), (1, 3, 3)])
def test_instances_auto_is_two_sharing_a_session_on_the_cpu_else_one_and_a_config_json_count_wins(
        engine_config, repo_copy, threads, config_json, want) -> None:
    """``instances = 0`` (the default; export writes no count into config.json): 2 on the CPU with one intra-op
    thread, where they share one session, on a machine of 2 or more cores, else 1; with an intra-op pool, 1; a
    model's config.json count is taken as it is. The resolved count is what the model reports and runs."""
    name = "digits-realnvp"
    path = repo_copy / name / "config.json"
    serving = json.loads(path.read_text())
    assert "instances" not in serving  # what export writes
    if config_json is not None:
        set_serving(repo_copy, name, instances=config_json)
    if want == "auto":
        want = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    cfg = replace(engine_config, repo=repo_copy, intra_op_threads=threads)
    assert cfg.instances == 0  # the server's default

    async def body(engine):
        model = engine.get_model(name)
        return model.serving.instances, dict(model.sessions), {g: b.instances for g, b in model.batchers.items()}

    instances, sessions, batchers = running(cfg, body)
    assert instances == want and set(batchers.values()) == {want}
    assert set(sessions.values()) == {1 if threads == 1 else want}
    with pytest.raises(ValueError, match=r"instances must be >= 0 \(0: auto\)"):
        replace(cfg, instances=-1)


def test_a_server_wide_setting_a_models_config_json_overrides_is_named_in_the_log(engine_config, repo_copy,
                                                                                  caplog) -> None:
    """Per-model settings win over the server-wide ones, as in Triton, so ``--max-queue-delay-ms 0.5`` does not
    reach a model whose config.json says 2.0: the load says so, naming the file, the setting and both values.
    Nothing is said where the operator left the server-wide value at its default."""
    import logging

    from genserve.server.repository import load_version

    name = "digits-realnvp"
    assert json.loads((repo_copy / name / "config.json").read_text())["max_queue_delay_ms"] == 2.0  # export's
    as_built = replace(engine_config, repo=repo_copy, max_batch_size=512, max_queue_delay_ms=2.0)  # the defaults
    changed = replace(as_built, max_queue_delay_ms=0.5)
    with caplog.at_level(logging.INFO, logger="genserve.server"):
        model = load_version(repo_copy, name, 1, changed.serving, 1)
    said = [r.getMessage() for r in caplog.records if "wins over the server-wide" in r.getMessage()]
    assert model.serving.max_queue_delay_ms == 2.0
    assert len(said) == 1 and "config.json sets max_queue_delay_ms = 2.0" in said[0] and "0.5" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="genserve.server"):
        load_version(repo_copy, name, 1, as_built.serving, 1)
    assert not [r for r in caplog.records if "wins over the server-wide" in r.getMessage()]


# ---- errors -------------------------------------------------------------------------------------------------------

def test_operations_the_model_lacks_are_unsupported_naming_what_it_can_do(engine_config, repo_copy) -> None:
    src, dst = repo_copy / "digits-ppca", repo_copy / "digits-sampler"
    shutil.copytree(src, dst)
    manifest = read_manifest(dst / "1" / "manifest.json")
    manifest.name = "digits-sampler"
    del manifest.operations[:]
    manifest.operations.extend([OPERATION["sample"], OPERATION["decode"]])
    write_manifest(manifest, dst / "1" / "manifest.json")
    x = np.zeros((1, 8, 8), np.float32)

    async def body(engine):
        with pytest.raises(Unsupported, match="supports: sample, decode"):
            await score(engine, "digits-sampler", x, 0)
        with pytest.raises(Unsupported, match="encode"):
            await encode(engine, "digits-sampler", x, 0)
        return await sample(engine, "digits-sampler", 2, 0)

    assert running(replace(engine_config, repo=repo_copy), body)[0].shape == (2, 8, 8)


def test_bad_inputs_are_invalid_and_unknown_names_not_found(engine_config) -> None:
    ppca, moons = "digits-ppca", "moons-ppca"
    ok = np.zeros((2, 8, 8), np.float32)

    def with_value(v):
        x = ok.copy()
        x[1, 3, 4] = v
        return x

    async def body(engine):
        bad_x = {
            "shape": (np.zeros((2, 8, 9), np.float32), "shape"), "no batch axis": (ok[0], "batch axis"),
            "empty": (ok[:0], "empty"), "NaN": (with_value(np.nan), "NaN"), "inf": (with_value(np.inf), "infinite"),
            "level 17": (with_value(17), "0..16"), "non-integer": (with_value(0.5), "integer"),
            "negative": (with_value(-1), "0..16"), "strings": (np.array([["a"] * 8] * 8)[None], "dtype"),
        }
        for what, (x, message) in bad_x.items():
            for call in (score(engine, ppca, x, 0), encode(engine, ppca, x, 0)):
                with pytest.raises(InvalidInput, match=message):
                    await call
                    pytest.fail(what)
        for z, message in [(np.zeros((2, 15), np.float32), r"\(N, 16\)"), (np.full((1, 16), np.nan), "NaN")]:
            with pytest.raises(InvalidInput, match=message):
                await decode(engine, ppca, z, 0)
        for n in (0, -3, engine.cfg.max_sample_n + 1):
            with pytest.raises(InvalidInput, match="n: .*samples asked for"):
                await sample(engine, ppca, n, 0)
        for t in (0.0, -1.0, float("inf"), float("nan"), 1000.0):
            with pytest.raises(InvalidInput, match="temperature"):
                await sample(engine, ppca, 1, 0, temperature=t)
        with pytest.raises(InvalidInput, match="langevin_steps: does not apply to sample of digits-ppca"):
            await sample(engine, ppca, 1, 0, langevin_steps=10)
        with pytest.raises(InvalidInput, match="seed"):
            await sample(engine, ppca, 1, -1)
        with pytest.raises(InvalidInput, match="importance_samples"):
            await score(engine, ppca, ok, 0, 0)
        with pytest.raises(InvalidInput, match="rows"):
            await score(engine, ppca, np.zeros((engine.cfg.max_rows_per_request + 1, 8, 8)), 0)
        with pytest.raises(InvalidInput, match=r"outside \[-1, 1\]|shape"):
            await score(engine, moons, np.zeros((1, 3), np.float32), 0)
        with pytest.raises(NotFound, match="digits-ppca"):  # the message lists the models there are
            await sample(engine, "no-such-model", 1, 0)
        with pytest.raises(NotFound, match="loaded versions: 1"):
            engine.get_model(ppca, 7)
        # the engine keeps serving after every refusal
        return await score(engine, ppca, ok, 0)

    lp, bpd, kind, version = running(replace(engine_config, max_rows_per_request=100), body)
    assert lp.shape == (2,) and np.isfinite(lp).all() and version == 1


def test_admit_checks_every_limit_in_one_place_naming_the_field(engine_config) -> None:
    """Engine.admit is where a request's limits are checked, for every face (each operation calls it too)."""
    async def body(engine):
        ppca = engine.resolve("digits-ppca", 0, "sample")
        scored = engine.resolve("digits-ppca", 0, "log_likelihood")
        decoder = engine.resolve("digits-ppca", 0, "decode")
        rows = np.zeros((engine.cfg.max_rows_per_request + 1, 8, 8), np.float32)
        refused = [
            (SampleRequest(ppca, 0, 1), "n"), (SampleRequest(ppca, engine.cfg.max_sample_n + 1, 1), "n"),
            (SampleRequest(ppca, 1, 1, temperature=0.0), "temperature"),
            (SampleRequest(ppca, 1, 1, langevin_steps=3), "langevin_steps"),
            (SampleRequest(ppca, 1, 1, langevin_step_size=0.1), "langevin_step_size"),
            (LikelihoodRequest(scored, rows, 1), "x"),
            (LikelihoodRequest(scored, rows[:2], 1, 4), "importance_samples"),
            (EncodeRequest(scored, rows, 1), "x"), (DecodeRequest(decoder, np.zeros((len(rows), 16)), 1), "z"),
        ]
        for request, field in refused:
            with pytest.raises(InvalidInput) as e:
                engine.admit(request)
            assert e.value.field == field and str(e.value).startswith(f"{field}: "), (request, str(e.value))
            with pytest.raises(InvalidInput):  # the operation itself checks the same limits
                await getattr(engine, request.operation)(request)
        engine.admit(SampleRequest(ppca, 1, 1, temperature=0.5))  # within every limit

    running(replace(engine_config, max_rows_per_request=100), body)


def test_a_request_runs_on_the_version_it_resolved_even_across_a_reload(engine_config, repo_copy) -> None:
    """A face resolves the model once; if a reload replaced that version (its files changed) before the request
    ran, it runs on what serves that version number now; if the version is gone, NotFound."""
    name = "digits-ppca"
    x = np.zeros((1, 8, 8), np.float32)

    async def body(engine):
        resolved = engine.resolve(name, 0, "log_likelihood")
        set_serving(repo_copy, name, max_batch_size=32)  # a new fingerprint: version 1 is loaded again
        reloaded = await engine.reload()
        replaced = engine.get_model(name, 1) is not resolved
        answer = await engine.log_likelihood(LikelihoodRequest(resolved, x, 0))
        add_version(repo_copy, name, 2)
        await engine.reload()
        old = engine.resolve(name, 1, "log_likelihood")
        shutil.rmtree(repo_copy / name / "1")
        await engine.reload()
        with pytest.raises(NotFound, match="no version 1"):
            await engine.log_likelihood(LikelihoodRequest(old, x, 0))
        return reloaded, replaced, answer

    reloaded, replaced, answer = running(replace(engine_config, repo=repo_copy), body)
    assert (name, 1) in reloaded.loaded and replaced
    assert answer.version == 1 and np.isfinite(answer.log_prob).all()


# ---- reload, failed loads, cancellation, metrics ---------------------------------------------------------------------

def add_version(repo: Path, name: str, version: int, corrupt: bool = False) -> None:
    src, tmp = repo / name / "1", repo / name / f".{version}.tmp"
    shutil.copytree(src, tmp)
    manifest = read_manifest(tmp / "manifest.json")
    manifest.version = version
    write_manifest(manifest, tmp / "manifest.json")
    if corrupt:
        graph = tmp / manifest.graphs[0].file
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    tmp.rename(repo / name / str(version))


def test_reload_serves_new_versions_keeps_old_ones_when_the_new_one_is_corrupt_and_fails_no_request(
        engine_config, repo_copy) -> None:
    name = "digits-ppca"
    # One submission per request (its 16 dequantisation draws together), never a full batch: each waits the
    # whole 500 ms window, so the requests are surely still in flight while the reloads run.
    set_serving(repo_copy, name, max_queue_delay_ms=500.0, max_batch_size=4096)
    x = np.zeros((1, 8, 8), np.float32)
    metrics = Metrics()

    def slow(engine, version):  # no early start when every request in flight has its rows queued
        for b in engine.get_model(name, version).batchers.values():
            b.expected = None

    async def body(engine):
        async def load(n):
            return await asyncio.gather(*(score(engine, name, x, i) for i in range(n)))

        slow(engine, 1)
        inflight = asyncio.ensure_future(load(32))
        await until(lambda: engine.get_model(name).active == 32)
        add_version(repo_copy, name, 2)
        r2 = await engine.reload()
        assert not inflight.done()
        during = await inflight  # requests that started on version 1 finished on it
        after = await load(4)
        add_version(repo_copy, name, 3, corrupt=True)
        r3 = await engine.reload()
        still = await score(engine, name, x, 0)
        status = next(s for s in engine.list_models() if s.name == name)
        slow(engine, 2)
        inflight = asyncio.ensure_future(load(16))
        await until(lambda: engine.get_model(name, 2).active == 16)
        shutil.rmtree(repo_copy / name / "2")
        r4 = await engine.reload()
        assert not inflight.done()
        last = await inflight
        return r2, during, after, r3, still, status, r4, last, engine.get_model(name).version

    r2, during, after, r3, still, status, r4, last, final = running(replace(engine_config, repo=repo_copy), body,
                                                                     metrics)
    assert (name, 2) in r2.loaded and not r2.errors
    assert {v for *_, v in during} == {1} and {v for *_, v in after} == {2}
    assert all(equal(d[0], a[0]) for d, a in zip(during[:4], after, strict=True))  # same graphs, same numbers
    assert [(e.model, e.version) for e in r3.errors] == [(name, 3)] and "sha256" in r3.errors[0].message
    assert still[3] == 2 and status.state == "READY" and status.versions == [1, 2] and "version 3" in status.message
    assert (name, 2) in r4.unloaded and {v for *_, v in last} == {2} and final == 1
    assert metrics.value("genserve_model_loaded", {"model": name, "version": "1"}) == 1
    assert metrics.value("genserve_model_loaded", {"model": name, "version": "3"}) == 0
    assert metrics.value("genserve_model_loaded", {"model": name, "version": "2"}) is None


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(engine_config, repo_copy) -> None:
    (repo_copy / "moons-ppca" / "1" / "manifest.json").write_text("{ not json")
    (repo_copy / "empty-model").mkdir()

    async def body(engine):
        statuses = {s.name: s for s in engine.list_models()}
        with pytest.raises(NotReady, match="does not parse"):
            await sample(engine, "moons-ppca", 1, 0)
        x, _, _ = await sample(engine, "digits-ppca", 1, 0)
        return statuses, x, engine.ready(), engine.ready("moons-ppca"), engine.ready("digits-ppca")

    statuses, x, ready, ready_moons, ready_digits = running(replace(engine_config, repo=repo_copy), body)
    assert statuses["moons-ppca"].state == "FAILED" and "does not parse" in statuses["moons-ppca"].message
    assert statuses["empty-model"].state == "FAILED" and "no version" in statuses["empty-model"].message
    assert statuses["digits-ppca"].state == "READY" and x.shape == (1, 8, 8)
    assert ready and not ready_moons and ready_digits


@pytest.mark.parametrize("damage, message", [
    (lambda g: g.inputs[0].shape.__setitem__(1, 9), "shape"),  # a fixed size the graph file does not have
    (lambda g: g.inputs[0].shape.append(4), "shape"),  # another rank
    (lambda g: setattr(g.outputs[0], "name", "nothing"), "no output 'nothing'"),
    (lambda g: setattr(g.inputs[0], "name", "y"), "inputs"),
])
def test_a_manifest_that_disagrees_with_its_graph_file_fails_to_load(engine_config, repo_copy, damage,
                                                                      message) -> None:
    """Checked at load time, so the model is FAILED with a message instead of INTERNAL on its first request."""
    folder = repo_copy / "digits-ppca" / "1"
    manifest = read_manifest(folder / "manifest.json")
    damage(next(g for g in manifest.graphs if g.name == "log_prob"))
    write_manifest(manifest, folder / "manifest.json")

    async def body(engine):
        with pytest.raises(NotReady, match="re-export"):
            await score(engine, "digits-ppca", np.zeros((1, 8, 8), np.float32), 0)
        return {s.name: s for s in engine.list_models()}, await sample(engine, "moons-ppca", 2, 0)

    statuses, (x, _, _) = running(replace(engine_config, repo=repo_copy), body)
    status = statuses["digits-ppca"]
    assert status.state == "FAILED" and "log_prob" in status.message and message in status.message, status.message
    assert x.shape == (2, 2)  # the other models serve


def test_cancelling_a_request_drops_its_queued_rows(engine_config, repo_copy) -> None:
    set_serving(repo_copy, "digits-ppca", max_queue_delay_ms=10_000.0, max_batch_size=4096)

    async def body(engine):
        batcher = engine.get_model("digits-ppca").batchers["encoder"]
        batcher.expected = None  # wait out the whole delay even when alone: the request stays queued
        task = asyncio.ensure_future(encode(engine, "digits-ppca", np.zeros((100, 8, 8), np.float32), 0))
        await until(lambda: batcher.queued_rows > 0)
        queued = batcher.queued_rows
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return queued, batcher.queued_rows, batcher.calls

    assert running(replace(engine_config, repo=repo_copy), body) == (100, 0, 0)


def test_metrics_count_batches_samples_rows_and_loaded_versions(engine_config) -> None:
    metrics = Metrics()
    x = np.zeros((3, 8, 8), np.float32)

    async def body(engine):
        await asyncio.gather(sample(engine, "digits-ppca", 5, 0),
                             score(engine, "digits-ppca", x, 0))
        return metrics.render()

    text = running(engine_config, body, metrics)
    assert metrics.value("genserve_samples_generated_total", {"model": "digits-ppca"}) == 5
    assert metrics.value("genserve_rows_scored_total", {"model": "digits-ppca"}) == 3
    assert metrics.value("genserve_model_loaded", {"model": "digits-ppca", "version": "1"}) == 1
    assert metrics.value("genserve_batch_size_rows_sum", {"model": "digits-ppca", "graph": "generator"}) == 5
    assert metrics.value("genserve_inflight_requests", {"model": "digits-ppca", "method": "Sample"}) == 0
    for name in ("genserve_inference_duration_seconds_bucket", "genserve_queue_wait_seconds_count",
                 "genserve_queue_depth_rows", "genserve_batch_size_rows_bucket"):
        assert name in text


def test_padded_batches_and_the_metrics_endpoint(engine_config) -> None:
    """pad_batches=on (the CUDA setting) gives the same numbers; /metrics serves the registry over HTTP."""
    import urllib.request

    x = np.random.default_rng(3).integers(0, 17, (5, 8, 8)).astype(np.float32)

    async def body(engine):
        lp = await asyncio.gather(*(score(engine, "digits-ppca", x[i:i + 1], i) for i in range(5)))
        s = await sample(engine, "digits-ppca", 3, 9)
        return np.concatenate([r[0] for r in lp]), s[0]

    plain = running(engine_config, body)
    metrics = Metrics()
    padded = running(replace(engine_config, pad_batches="on"), body, metrics)
    buckets = running(replace(engine_config, pad_batches="buckets"), body)
    assert equal(plain[0], padded[0]) and equal(plain[1], padded[1])
    assert equal(plain[0], buckets[0]) and equal(plain[1], buckets[1])
    server, port = metrics.serve_http("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'genserve_rows_scored_total{model="digits-ppca"} 5.0' in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert 'python_gc_collections_total{generation="2"}' in text  # what settle_heap (server/process.py) cuts
    assert "_created" not in text  # no creation-time series beside every counter and histogram


@pytest.mark.parametrize(("handoff_s", "want_s"), [(50e-6, 800e-6), (1e-6, 100e-6), (1.0, 5e-3)])
def test_unset_inline_call_us_is_16_measured_hand_offs_within_bounds(engine_config, monkeypatch, handoff_s,
                                                                        want_s) -> None:
    """``inline_call_us`` unset: the engine measures a thread hand-off once at start (``handoff_cost``) and gives
    every batcher 16 of them as ``inline_call_s``, kept within 100 us..5 ms; a value that is set is used as it
    is, with nothing measured."""
    import genserve.server.engine as engine_module

    measured: list[object] = []

    async def fake_cost(executor):
        measured.append(executor)
        return handoff_s

    monkeypatch.setattr(engine_module, "handoff_cost", fake_cost)

    async def body(engine):
        return engine.inline_call_s, {b.inline_call_s for b in engine.get_model("digits-ppca").batchers.values()}

    assert engine_config.inline_call_us is None  # the default
    got, batchers = running(engine_config, body)
    assert got == pytest.approx(want_s) and batchers == {got} and len(measured) == 1 and measured[0] is not None
    measured.clear()
    got, batchers = running(replace(engine_config, inline_call_us=250.0), body)
    assert got == pytest.approx(250e-6) and batchers == {got} and measured == []
    got, batchers = running(replace(engine_config, inline_call_us=0.0), body)
    assert got == 0.0 and batchers == {0.0} and measured == []


@pytest.mark.parametrize(("inline_us", "idle_us", "want_idle_s", "counted"),
                         [(None, None, 4 * 800e-6, True), (250.0, None, 1e-3, True), (250.0, 3000.0, 3e-3, True),
                          (250.0, 0.0, 0.0, False), (0.0, None, 0.0, False)])
def test_unset_inline_idle_call_us_is_four_times_the_inline_call(engine_config, monkeypatch, inline_us, idle_us,
                                                                   want_idle_s, counted) -> None:
    """``inline_idle_call_us`` unset (the default): 4 x ``inline_call_s`` (measured or chosen), and the engine
    counts what is in flight (its ``Occupancy``) for the rule; 0, or inline calls turned off, turns it off and
    nothing is counted per request."""
    import genserve.server.engine as engine_module

    async def fake_cost(executor):
        return 50e-6  # 16 hand-offs: 800 us

    monkeypatch.setattr(engine_module, "handoff_cost", fake_cost)

    async def body(engine):
        batchers = engine.get_model("digits-ppca").batchers.values()
        await score(engine, "digits-ppca", np.zeros((2, 8, 8), np.float32), 0)
        return (engine.inline_idle_call_s, {b.inline_idle_call_s for b in batchers},
                {b.occupancy is engine.occupancy for b in batchers}, engine.occupancy)

    assert engine_config.inline_idle_call_us is None  # the default
    got, batchers, shared, occupancy = running(replace(engine_config, inline_call_us=inline_us,
                                                       inline_idle_call_us=idle_us), body)
    assert got == pytest.approx(want_idle_s) and batchers == {got} and shared == {True}
    assert (occupancy is not None) == counted
    if counted:
        assert occupancy.now == 0 and occupancy._peak_now == 1  # the request above entered and left


@pytest.mark.parametrize(("factor", "shared"), [(5.0, True), (1.0, False)])
def test_the_engines_loop_load_reaches_every_batcher_with_the_busy_delay_factor(engine_config, factor,
                                                                                 shared) -> None:
    """``busy_delay_factor`` (default 5) reaches every batcher with the engine's one ``LoopLoad`` (made by
    ``start``, on the engine's loop); 1 makes none (never longer); below 1 is refused."""
    async def body(engine):
        batchers = engine.get_model("digits-ppca").batchers.values()
        await asyncio.gather(*(score(engine, "digits-ppca", np.zeros((2, 8, 8), np.float32), s) for s in range(4)))
        return ({b.busy_delay_factor for b in batchers}, {b.loop_load is engine.loop_load for b in batchers},
                engine.loop_load)

    assert ServerConfig.__dataclass_fields__["busy_delay_factor"].default == 5.0
    factors, same, load = running(replace(engine_config, busy_delay_factor=factor), body)
    assert factors == {factor} and same == {True} and (load is not None) == shared
    with pytest.raises(ValueError, match="busy_delay_factor must be a finite number >= 1"):
        replace(engine_config, busy_delay_factor=0.5)
