"""Parity of every exported graph with its PyTorch module at batch sizes 1, 7 and 64, real and random inputs.

Real inputs are what the server will feed: the family's serving program runs its operations (log-likelihood
and encoding of test rows, sampling, decoding) over the PyTorch graphs and every graph call is recorded, so
autoregressive steps, hidden states, Langevin iterates and importance samples are all covered. Graphs the
program does not reach (or families without a program yet) get data inputs from the test rows and draws for
noise and latent inputs. Random inputs are draws shaped like the graph's example inputs: random levels or
rows for data, uniforms for [0, 1) inputs, normals otherwise.

Tolerance: max |ORT - PyTorch| <= ``ATOL`` (1e-4) + ``RTOL`` (4e-6) * max |PyTorch| per output. The second
term is about 32 float32 rounding steps of the output's largest magnitude (a stack of three MAF transforms of zuko
reached 9 at an input far from its data): a log-density of -3000 nats at
a random input cannot be computed to 1e-4 absolute in float32 by either runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.server.programs.base import Feeds, Program, run_sync
from genserve.training.base import GraphDef

ATOL = 1e-4
RTOL = 4e-6
BATCH_SIZES = (1, 7, 64)
POOL_ROWS = 512  # recorded rows kept per graph for the real-input check
OPERATION_ROWS = 16  # rows per recorded operation: cheap even with 500 importance samples


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree; the message names graph, inputs, batch size and output."""


@dataclass
class GraphParity:
    """Worst disagreement of one graph over every input set, batch size and output."""

    graph: str
    max_abs_error: float = 0.0
    max_scaled_error: float = 0.0  # error / (ATOL + RTOL * max|PyTorch|); <= 1 passes
    checks: list[tuple[str, int, str, float]] = field(default_factory=list)  # (inputs, batch, output, error)


def _is_data_input(name: str, example: torch.Tensor, spec: DataSpec) -> bool:
    return name == "x" and tuple(example.shape[1:]) in (spec.shape, (spec.dim,))


def _draw_like(example: torch.Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws shaped like ``example`` (batch n): integers, uniforms or normals, by what the example holds."""
    ex = example.detach().float().numpy()
    shape = (n, *ex.shape[1:])
    if ex.size and np.all(ex == np.round(ex)) and ex.max() > ex.min():
        return rng.integers(int(ex.min()), int(ex.max()) + 1, size=shape).astype(np.float32)
    if ex.size and ex.min() >= 0 and ex.max() <= 1:
        return rng.random(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32)


def _random_data(spec: DataSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.discrete:
        return rng.integers(0, spec.levels, size=(n, spec.dim)).astype(np.float32)
    mean = np.asarray(spec.mean or [0.0] * spec.dim, dtype=np.float32)
    std = np.asarray(spec.std or [1.0] * spec.dim, dtype=np.float32)
    return (mean + std * rng.standard_normal((n, spec.dim))).astype(np.float32)


def drawn_inputs(graph: GraphDef, spec: DataSpec, n: int, rng: np.random.Generator,
                 data_rows: np.ndarray | None = None) -> Feeds:
    """n rows for every input: ``data_rows`` (or random data) for data inputs, draws for the others."""
    feeds = {}
    for name, ex in graph.inputs.items():
        if _is_data_input(name, ex, spec):
            rows = data_rows if data_rows is not None else _random_data(spec, n, rng)
            idx = rng.choice(len(rows), size=n, replace=len(rows) < n)
            feeds[name] = np.asarray(rows, dtype=np.float32)[idx].reshape(n, *ex.shape[1:])
        else:
            feeds[name] = _draw_like(ex, n, rng)
    return feeds


class RecordingRunner:
    """Wraps a ``run`` callable and keeps up to 64 random rows of every call's feeds, per graph."""

    def __init__(self, inner: Callable[[str, Feeds], Any], seed: int = 0) -> None:
        self.inner = inner
        self.rng = np.random.default_rng(seed)
        self.records: dict[str, list[Feeds]] = {}

    async def __call__(self, graph: str, feeds: Feeds) -> Feeds:
        b = len(next(iter(feeds.values())))
        idx = self.rng.choice(b, size=min(b, 64), replace=False)
        self.records.setdefault(graph, []).append({k: np.array(v)[idx] for k, v in feeds.items()})
        return await self.inner(graph, feeds)

    def pool(self, graph: str, rows: int = POOL_ROWS) -> Feeds | None:
        """Up to ``rows`` recorded rows of ``graph``'s inputs over all its calls; None if never called."""
        calls = self.records.get(graph)
        if not calls:
            return None
        cat = {k: np.concatenate([c[k] for c in calls]) for k in calls[0]}
        n = len(next(iter(cat.values())))
        idx = self.rng.choice(n, size=min(n, rows), replace=False)
        return {k: v[idx] for k, v in cat.items()}


def record_program_feeds(program: Program, run: Callable[[str, Feeds], Any], x: np.ndarray,
                         operations: tuple[str, ...],
                         latent_dim: int | None) -> tuple[RecordingRunner, list[str]]:
    """Run each operation of ``program`` on a few rows through a recorder; returns it and the errors met."""
    rec = RecordingRunner(run)
    n = min(OPERATION_ROWS, len(x))
    rows = x[:n].astype(np.float32)
    errors: list[str] = []
    z = None

    async def go(op: str) -> None:
        nonlocal z
        if op == "log_likelihood":
            await program.log_likelihood(rec, rows, Noise(0))
        elif op == "sample":
            await program.sample(rec, n, Noise(1))
        elif op == "encode":
            z = await program.encode(rec, rows, Noise(2))
        elif op == "decode":
            zz = z if z is not None else Noise(3).normal(n, latent_dim or program.spec.dim)
            await program.decode(rec, np.asarray(zz, dtype=np.float32), Noise(3))

    for op in ("log_likelihood", "sample", "encode", "decode"):
        if op in operations:
            try:
                run_sync(go(op))
            except Exception as e:  # reported by the caller; the operation check will fail loudly anyway
                errors.append(f"{op}: {type(e).__name__}: {e}")
    return rec, errors


def torch_outputs(graph: GraphDef, feeds: Feeds) -> list[np.ndarray]:
    with torch.no_grad():
        out = graph.module(*[torch.from_numpy(np.ascontiguousarray(feeds[k], dtype=np.float32))
                             for k in graph.inputs])
    out = out if isinstance(out, tuple | list) else (out,)
    return [t.detach().float().numpy() for t in out]


def take_rows(pool: Feeds, b: int, rng: np.random.Generator) -> Feeds:
    n = len(next(iter(pool.values())))
    idx = rng.choice(n, size=b, replace=n < b)
    return {k: np.ascontiguousarray(v[idx], dtype=np.float32) for k, v in pool.items()}


def check_graph_parity(name: str, graph: GraphDef, session: Any, input_sets: dict[str, Feeds],
                       batch_sizes: tuple[int, ...] = BATCH_SIZES, atol: float = ATOL, rtol: float = RTOL,
                       seed: int = 0) -> GraphParity:
    """Compare ONNX Runtime ``session`` with ``graph.module`` on rows of each input set at each batch size.

    ``input_sets`` maps a label ("real", "random") to a pool of rows per input. Raises ParityError naming the
    graph, the inputs, the batch size, the output and the error at the first disagreement beyond tolerance.
    """
    rng = np.random.default_rng(seed)
    report = GraphParity(name)
    names = [o.name for o in session.get_outputs()]
    for label, pool in input_sets.items():
        for b in batch_sizes:
            feeds = take_rows(pool, b, rng)
            try:
                got = session.run(names, feeds)
            except Exception as e:
                raise ParityError(f"graph {name!r} fails in ONNX Runtime at batch {b} ({label} inputs): "
                                  f"{str(e).splitlines()[0][:300]}") from None
            want = torch_outputs(graph, feeds)
            for out_name, g, w in zip(names, got, want, strict=True):
                if g.shape != w.shape:
                    raise ParityError(f"graph {name!r} output {out_name!r} at batch {b} ({label} inputs): "
                                      f"ONNX Runtime shape {g.shape}, PyTorch {w.shape}")
                if not (np.isfinite(w).all() and np.isfinite(g).all()):
                    same = np.array_equal(np.isfinite(g), np.isfinite(w)) and np.allclose(
                        g[np.isfinite(w)], w[np.isfinite(w)], rtol=0, atol=atol + rtol * _scale(w))
                    if not same:
                        raise ParityError(f"graph {name!r} output {out_name!r} at batch {b} ({label} inputs):"
                                          " non-finite values differ between ONNX Runtime and PyTorch")
                    fin = np.isfinite(w)
                    g, w = g[fin], w[fin]
                err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
                tol = atol + rtol * _scale(w)
                report.checks.append((label, b, out_name, err))
                report.max_abs_error = max(report.max_abs_error, err)
                report.max_scaled_error = max(report.max_scaled_error, err / tol)
                if err > tol:
                    raise ParityError(
                        f"graph {name!r} output {out_name!r} at batch {b} ({label} inputs): "
                        f"max |ORT - PyTorch| = {err:.3g} > tolerance {tol:.3g} "
                        f"(= {atol:g} + {rtol:g} * max|PyTorch| {_scale(w):.3g})")
    return report


def _scale(w: np.ndarray) -> float:
    fin = w[np.isfinite(w)]
    return float(np.abs(fin).max()) if fin.size else 0.0


def graph_input_sets(name: str, graph: GraphDef, spec: DataSpec, test_rows: np.ndarray | None,
                     recorded: Feeds | None, seed: int = 0) -> tuple[dict[str, Feeds], str]:
    """The "real" and "random" pools of one graph, and where the real one came from."""
    rng = np.random.default_rng(seed)
    if recorded is not None:
        real, source = recorded, "program"
    else:
        rows = None if test_rows is None else test_rows.reshape(len(test_rows), -1)
        real = drawn_inputs(graph, spec, POOL_ROWS, rng, rows)
        source = "data" if rows is not None else "random"
    return {"real": real, "random": drawn_inputs(graph, spec, POOL_ROWS, rng)}, source


def onnx_session(path: str | Path) -> Any:
    """A single-threaded CPU ONNX Runtime session for parity checks (the reference provider)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


# ---- operations: the serving program over ONNX Runtime against the PyTorch model ------------------------
LL_ATOL = 1e-3  # nats per example
LL_RTOL = 16 * 2.0**-24
"""Plus this much of |log p| (about 1e-6 of it): sixteen float32 rounding steps of the value itself. A 32x32x3
image of 256 levels has log p near -18700 nats, where one float32 step (ulp) is 0.002 nats, so two runtimes that
sum 3072 terms in another order cannot agree to LL_ATOL alone. How far apart they land depends on the CPU's
vector width: 2 ulps on an avx512 Xeon, 3 (0.0059 nats) on an avx2 AMD EPYC, where the earlier bound of four
steps (2.3 ulps) failed the export. Sixteen steps is 9 ulps there (0.018 nats); at digits' -100 nats it adds
1e-4 nats."""
LATENT_ATOL = 1e-4  # encode outputs and continuous decodes, absolute
SAMPLE_RTOL = 1e-4  # continuous samples: |a - b| <= SAMPLE_RTOL * (1 + |b|)
FLIP_FRACTION = 0.01
"""Discrete samples and decodes may differ in at most this fraction of values: a float32 difference of 1e-7
between runtimes decides a draw whose uniform falls within 1e-7 of a CDF edge, or a value within 1e-7 of a
rounding midpoint. Every other value must be equal."""


@dataclass
class OperationParity:
    """Measured agreement of each operation (absent when the family lacks it)."""

    ll_max_abs_nats: float | None = None
    ll_mean_torch_nats: float | None = None
    sample_mismatch_fraction: float | None = None
    sample_max_abs: float | None = None
    encode_max_abs: float | None = None
    decode_mismatch_fraction: float | None = None
    decode_max_abs: float | None = None

    def summary(self) -> str:
        parts = []
        if self.ll_max_abs_nats is not None:
            parts.append(f"log-likelihood max|diff| {self.ll_max_abs_nats:.2g} nats")
        if self.sample_mismatch_fraction is not None:
            parts.append(f"samples differ in {self.sample_mismatch_fraction:.2%} of values "
                         f"(max|diff| {self.sample_max_abs:.2g})")
        if self.encode_max_abs is not None:
            parts.append(f"encode max|diff| {self.encode_max_abs:.2g}")
        if self.decode_max_abs is not None:
            parts.append(f"decode max|diff| {self.decode_max_abs:.2g}")
        return ", ".join(parts)


def _compare_data(a: np.ndarray, b: np.ndarray, spec: DataSpec, what: str) -> tuple[float, float]:
    """(mismatch fraction, max |a - b|) of data-domain outputs; raises beyond tolerance."""
    if a.shape != b.shape:
        raise ParityError(f"{what}: serving program gives shape {a.shape}, PyTorch {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if spec.discrete:
        frac = float((diff > 0).mean())
        if frac > FLIP_FRACTION:
            raise ParityError(f"{what}: {frac:.2%} of values differ between the serving program and PyTorch "
                              f"(allowed {FLIP_FRACTION:.0%})")
    else:
        frac = float((diff > SAMPLE_RTOL * (1 + np.abs(b))).mean())
        if frac > 0:
            raise ParityError(f"{what}: max |program - PyTorch| = {diff.max():.3g} exceeds "
                              f"{SAMPLE_RTOL:g} * (1 + |x|)")
    return frac, float(diff.max()) if diff.size else 0.0


def check_operations(model: Any, program: Program, run: Callable[[str, Feeds], Any], x: np.ndarray,
                     n_samples: int = 16, seed: int = 1234) -> OperationParity:
    """Run every operation both ways with the same Noise seeds; ParityError naming the operation on mismatch.

    ``model`` is the PyTorch GenerativeModel (eval mode), ``program`` its serving program, ``run`` the ONNX
    Runtime runner, ``x`` data rows (N, *shape). Tolerances: log-likelihood ``LL_ATOL`` + ``LL_RTOL`` |log p|
    nats per example, encode ``LATENT_ATOL``, samples and decodes exact for discrete data up to ``FLIP_FRACTION``.
    """
    res = OperationParity()
    ops = set(model.operations)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if "log_likelihood" in ops:
        with torch.no_grad():
            want = model.log_prob(xt, Noise(seed)).detach().double().numpy()
        got = np.asarray(run_sync(program.log_likelihood(run, xt.numpy(), Noise(seed))), dtype=np.float64)
        if got.shape != want.shape:
            raise ParityError(f"log_likelihood: program gives shape {got.shape}, PyTorch {want.shape}")
        res.ll_max_abs_nats = float(np.abs(got - want).max())
        res.ll_mean_torch_nats = float(want.mean())
        if not (np.abs(got - want) <= LL_ATOL + LL_RTOL * np.abs(want)).all():
            raise ParityError(f"log_likelihood: max |program - PyTorch| = {res.ll_max_abs_nats:.3g} nats "
                              f"per example > {LL_ATOL:g} + {LL_RTOL:.2g} |log p| (mean log p {want.mean():.2f} nats)")
    if "sample" in ops:
        # grad mode left on: an energy model's Langevin sampler differentiates with respect to x
        want = model.sample(n_samples, Noise(seed + 1)).detach().numpy()
        got = run_sync(program.sample(run, n_samples, Noise(seed + 1))).x
        res.sample_mismatch_fraction, res.sample_max_abs = _compare_data(got, want, model.spec, "sample")
    z = None
    if "encode" in ops:
        with torch.no_grad():
            want = model.encode(xt, Noise(seed + 2)).detach().numpy()
        got = np.asarray(run_sync(program.encode(run, xt.numpy(), Noise(seed + 2))))
        if got.shape != want.shape:
            raise ParityError(f"encode: serving program gives shape {got.shape}, PyTorch {want.shape}")
        res.encode_max_abs = float(np.abs(got - want).max())
        if not res.encode_max_abs <= LATENT_ATOL:
            raise ParityError(f"encode: max |program - PyTorch| = {res.encode_max_abs:.3g} > {LATENT_ATOL:g}")
        z = want
    if "decode" in ops:
        if z is None:
            q = int(program.params.get("latent_dim", model.spec.dim))
            z = Noise(seed + 3).normal(len(xt), q)
        z = np.asarray(z, dtype=np.float32)
        with torch.no_grad():
            want = model.decode(torch.from_numpy(z), Noise(seed + 3)).detach().numpy()
        got = np.asarray(run_sync(program.decode(run, z, Noise(seed + 3))))
        res.decode_mismatch_fraction, res.decode_max_abs = _compare_data(got, want, model.spec, "decode")
    return res
