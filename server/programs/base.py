"""The program interface: a family's operations written as async code over named graphs.

A program never touches ONNX Runtime itself: it awaits ``run(graph, feeds)``. In the server ``run`` goes
through the per-graph dynamic batcher, so the steps of concurrent requests (autoregressive steps, Langevin
steps, importance samples) merge into shared ONNX Runtime calls; in export's parity checks ``run`` calls ONNX
Runtime or PyTorch directly. Randomness comes from the request's ``Noise`` stream, in the same order as the
PyTorch model draws it, so results are identical whichever way the graphs are run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from genserve.core.noise import Noise
from genserve.core.spec import DataSpec

Feeds = dict[str, np.ndarray]
Run = Callable[[str, Feeds], Awaitable[Feeds]]
"""``await run(graph_name, {input_name: array}) -> {output_name: array}``; arrays float32, batch axis 0."""

T = TypeVar("T")


@dataclass
class SampleResult:
    """Samples in the data domain (n, *shape) and, where the family has them, the latents used (n, q)."""

    x: np.ndarray
    latents: np.ndarray | None = None


class Program:
    """Base class: the operations a family serves. Subclasses set ``operations`` and override them."""

    operations: tuple[str, ...] = ()

    def __init__(self, spec: DataSpec, params: dict[str, float]) -> None:
        self.spec = spec
        self.params = dict(params)

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
