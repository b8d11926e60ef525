"""The program interface: a family's operations written as async code over named graphs.

A program never touches ONNX Runtime itself: it awaits ``run(graph, feeds)``. In the server ``run`` goes
through the per-graph dynamic batcher, so the steps of concurrent requests (autoregressive steps, Langevin
steps, importance samples) merge into shared ONNX Runtime calls; in export's parity checks ``run`` calls ONNX
Runtime or PyTorch directly. Randomness comes from the request's ``Noise`` stream, in the same order as the
PyTorch model draws it, so results are identical whichever way the graphs are run.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from genserve.core.bounds import LogMeanExp
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec

Feeds = dict[str, np.ndarray]
Run = Callable[[str, Feeds], Awaitable[Feeds]]
"""``await run(graph_name, {input_name: array}) -> {output_name: array}``; arrays float32, batch axis 0."""

T = TypeVar("T")

MOST_STEPS = 65536
"""The most Langevin steps or importance samples anything may ask for, a model's own manifest default included,
whatever the server's limits (``--max-langevin-steps``, ``--max-importance-samples`` cap a request's further).
Unbounded, a damaged or hand-edited default (1e9) loaded and then ran its warm-up, and every request that left the
option unset, for days."""


@dataclass(frozen=True)
class GraphSignature:
    """A graph's inputs (name -> shape, -1 for the batch axis) and output names, as the manifest lists them."""

    inputs: dict[str, tuple[int, ...]]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Option:
    """An option one operation of a program takes: its type, its valid range and its default.

    ``default`` names a manifest parameter (the model's own default) or is a value; ``high`` may be capped
    further by the server's limits (``Program.check_options(..., caps=...)``).
    """

    name: str
    operation: str
    kind: type
    low: float | None = None
    high: float | None = None
    default: str | float | bool | None = None
    doc: str = ""
    open_low: bool = False
    """``low`` itself is not allowed (a step size must be > 0)."""


class InvalidOption(ValueError):
    """An option that does not apply to the operation or is out of range; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SampleResult:
    """Samples in the data domain (n, *shape) and, where the family has them, the latents used (n, q)."""

    x: np.ndarray
    latents: np.ndarray | None = None


class Program:
    """Base class: the operations a family serves. Subclasses set ``operations`` and override them."""

    operations: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    """The options each operation takes, declared once; ``check_options`` validates a request's against them."""

    @property
    def sampled(self) -> tuple[str, ...]:
        """Of encode and decode, those that map to a distribution and draw from it with ``sample=True`` (the
        VAE's q(z|x) and p(x|z), pPCA's p(x|z)); the others are deterministic maps and refuse ``sample``."""
        return tuple(o.operation for o in self.options if o.name == "sample")

    def declared(self, operation: str) -> dict[str, Option]:
        """The options ``operation`` takes, by name."""
        return {o.name: o for o in self.options if o.operation == operation}

    def check_options(self, operation: str, given: dict[str, Any], caps: dict[str, float] | None = None,
                      model: str = "this model") -> dict[str, Any]:
        """``given`` (unset options left out) checked against the declarations and typed; InvalidOption naming
        an option that does not apply to this model's ``operation``, has the wrong type or is out of range."""
        declared, out = self.declared(operation), {}
        for name, value in given.items():
            opt = declared.get(name)
            if opt is None and name == "sample":
                which = ", ".join(self.sampled) or "none of its operations"
                raise InvalidOption(f"{operation} of {model} is a deterministic map with nothing to draw from; leave "
                                    f"sample unset (it draws in: {which})", name)
            if opt is None:
                takes = ", ".join(declared) or "no options"
                raise InvalidOption(f"does not apply to {operation} of {model}, whose {operation} takes {takes}: "
                                    "leave it unset", name)
            if opt.kind is bool:
                if not isinstance(value, bool | np.bool_):
                    raise InvalidOption(f"{value!r} is not true or false", name)
                out[name] = bool(value)
                continue
            try:
                number = opt.kind(value)
            except (TypeError, ValueError, OverflowError):  # int(inf) overflows
                what = "a whole number" if opt.kind is int else "a number"
                raise InvalidOption(f"{value!r} is not {what}", name) from None
            if opt.kind is int and number != value:
                raise InvalidOption(f"{value!r} is not a whole number", name)
            high = min(opt.high, (caps or {}).get(name, np.inf)) if opt.high is not None else \
                (caps or {}).get(name)
            too_low = opt.low is not None and (number <= opt.low if opt.open_low else number < opt.low)
            infinite = isinstance(number, float) and not math.isfinite(number)  # an int may exceed any float
            if infinite or too_low or (high is not None and number > high):
                top = f"{high:g}" if high is not None else "inf"
                rng = f"({opt.low:g}, {top}]" if opt.open_low else \
                    f"{opt.low if opt.low is not None else '-inf'}..{top}"
                raise InvalidOption(f"{value} is outside {rng}; use a number in that range", name)
            out[name] = number
        return out

    def __init__(self, spec: DataSpec, params: dict[str, float],
                 graphs: dict[str, GraphSignature] | None = None) -> None:
        self.spec = spec
        self.params = dict(params)
        self.graphs = dict(graphs or {})
        """The model's graphs by name: which optional graphs exist (an AR ``step``) and their state shapes."""
        for opt in self.options:  # the model's own defaults obey the ranges a request's options do
            if isinstance(opt.default, str) and opt.default in self.params and opt.kind is not bool:
                try:
                    self.check_options(opt.operation, {opt.name: self.params[opt.default]})
                except InvalidOption as e:  # e.g. 1e9 dequantisation draws: every default request would run forever
                    raise ValueError(f"manifest parameter {opt.default!r} (the default {opt.name} of "
                                     f"{opt.operation}): {e}; re-export the model") from None
        if "latent_dim" in self.params:  # sizes the noise drawn for every sample: 1e9 would be gigabytes a row
            widths = sorted({shape[1] for g in self.graphs.values() for name, shape in g.inputs.items()
                             if name == "z" and len(shape) == 2 and shape[1] > 0})
            q = self.whole("latent_dim", 1, max(widths) if widths else 2**20)
            if widths and q not in widths:
                raise ValueError(f"manifest parameter 'latent_dim' is {q}, but the graphs take z of width "
                                 f"{' or '.join(map(str, widths))}; re-export the model")

    def whole(self, key: str, low: int, high: int) -> int:
        """Manifest parameter ``key`` as a whole number in ``low..high``; else ValueError naming it (a count
        of loop passes or a size read from a damaged manifest would otherwise run forever or exhaust memory)."""
        value = self.param(key)
        if not (np.isfinite(value) and value == int(value) and low <= value <= high):
            raise ValueError(f"manifest parameter {key!r} is {value!r}; it must be a whole number in {low}..{high}; "
                             "re-export the model")
        return int(value)

    def param(self, key: str) -> float:
        if key not in self.params:
            raise ValueError(f"manifest parameters lack {key!r} (have {sorted(self.params)}); re-export the model")
        return self.params[key]

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        raise NotImplementedError("sample")

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """log p(x) in nats per row, shape (N,)."""
        raise NotImplementedError("log_likelihood")

    async def encode(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        raise NotImplementedError("encode")

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        raise NotImplementedError("decode")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a program coroutine to completion outside the server (tests, export parity, benchmarks)."""
    return asyncio.run(coro)


def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float32, copy=False)


DEQUANT_ROWS = 4096
"""Most graph rows one dequantised scoring submission holds (draws x rows); bounds its memory."""


async def dequantised_log_prob(run: Run, graph: str, x: np.ndarray, noise: Noise, dim: int, draws: int
                               ) -> np.ndarray:
    """log (1/K) sum_k p(x + u_k) over K = ``draws`` uniform draws u_k = noise.uniform(N, dim), nats per row (N,).

    The log-mean-exp (genserve.core.bounds), a lower bound on log P(x) of the integer x that tightens with K,
    where the mean of log p(x + u_k) stays where it is. The draws of one request go to the graph together, as
    rows d*N + n of as few submissions as fit in DEQUANT_ROWS rows: one batcher submission per request instead
    of one per draw, so a request costs the batcher (and the event loop) one round trip; memory stays bounded
    for any K (a submission's rows plus O(N) running sums). Consecutive draws are one ``uniform(k*N, dim)``
    call, which yields the same numbers as k calls of (N, dim), and the draws are added one by one in float64,
    so the result is the same as scoring the draws one at a time (training.realnvp / training.ppca
    ``log_prob``).
    """
    n = x.shape[0]
    per_call = max(1, DEQUANT_ROWS // n)
    bound = LogMeanExp(n)
    for first in range(0, draws, per_call):
        k = min(per_call, draws - first)
        u = noise.uniform(k * n, dim)
        xs = np.broadcast_to(x, (k, *x.shape)).reshape(k * n, *x.shape[1:])
        log_prob = (await run(graph, {"x": xs, "u": u}))["log_prob"].reshape(k, n)
        bound.add_draws(log_prob)  # draw by draw in effect: the one-draw-at-a-time loop's numbers, bit for bit
    return bound.value().astype(np.float32)
