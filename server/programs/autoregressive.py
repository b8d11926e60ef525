"""Autoregressive models served from their graphs: exact log-likelihood in one pass, sampling in D steps.

Graphs (the autoregressive family contract, docs/contract.md): ``logits`` (x -> conditional parameters of every
position) and, optionally, ``step`` (x_prev, *state, t -> conditional parameters of position t, *state_next),
so that sampling carries a state instead of re-reading the prefix. Discrete data have ``logits`` (B, D, levels);
continuous data
a Gaussian mixture per feature in normalised units: ``logits``, ``means``, ``log_scales``, each (B, D, K).
Noise is drawn in the order of ``training.autoregressive.AutoregressiveModel.sample``: per step i, one
``noise.uniform(n)`` and, for continuous data, one ``noise.normal(n)``.

A model in another pixel order (``core.orders``; the manifest parameter ``order``, raster when absent) has its
``logits`` graph in the natural layout still, so the likelihood is unchanged; sampling step i draws the natural
position ``positions[i]`` (from the ``logits`` output there, or from the ``step`` graph called with t = i).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.noise import Noise, categorical_from_uniform
from genserve.core.orders import order_name, order_positions
from genserve.core.spec import DataSpec
from genserve.server.programs.base import GraphSignature, Option, Program, Run, SampleResult, flat

LOG2PI = float(np.log(2 * np.pi))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    a = logits.astype(np.float64)
    a = a - a.max(axis=-1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


def _softmax32(logits: np.ndarray) -> np.ndarray:
    """Softmax in float32 like torch.softmax, so that inverse-CDF draws agree with PyTorch's at the edges."""
    a = logits.astype(np.float32)
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _names(spec: DataSpec) -> tuple[str, ...]:
    return ("logits",) if spec.discrete else ("logits", "means", "log_scales")


def conditional_log_prob(spec: DataSpec, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    """sum_i log p(x_i | x_<i) in nats, (N,), for flat x (N, D) in raw units; float64 arithmetic."""
    if spec.discrete:
        logp = _log_softmax(params[0])
        return np.take_along_axis(logp, x.astype(np.int64)[..., None], axis=-1)[..., 0].sum(-1)
    logits, means, log_scales = (p.astype(np.float64) for p in params)
    mean, std = np.asarray(spec.mean or 0.0), np.asarray(spec.std or 1.0)  # a spec without them: raw units
    y = ((x.astype(np.float64) - mean) / std)[..., None]
    z = (y - means) * np.exp(-log_scales)
    comp = _log_softmax(logits) - 0.5 * z * z - log_scales - 0.5 * LOG2PI
    top = comp.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(comp - top).sum(axis=-1, keepdims=True)))[..., 0]
    return lse.sum(-1) - np.log(std).sum()


def conditional_terms(spec: DataSpec, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    """log p(x_i | x_<i) in nats per position, (N, D) float64, for flat x (N, D) in raw units: the terms
    ``conditional_log_prob`` sums (continuous data in raw units: each term includes -log std_i)."""
    if spec.discrete:
        logp = _log_softmax(params[0])
        return np.take_along_axis(logp, x.astype(np.int64)[..., None], axis=-1)[..., 0]
    logits, means, log_scales = (p.astype(np.float64) for p in params)
    mean, std = np.asarray(spec.mean or 0.0), np.asarray(spec.std or 1.0)
    y = ((x.astype(np.float64) - mean) / std)[..., None]
    z = (y - means) * np.exp(-log_scales)
    comp = _log_softmax(logits) - 0.5 * z * z - log_scales - 0.5 * LOG2PI
    top = comp.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(comp - top).sum(axis=-1, keepdims=True)))[..., 0]
    return lse - np.log(std) * np.ones(x.shape[1])


def draw_position(spec: DataSpec, i: int, params: list[np.ndarray], noise: Noise, temperature: float) -> np.ndarray:
    """x_i (n,) float32 in raw units from the conditional parameters of position i, each (n, P)."""
    n = params[0].shape[0]
    u = noise.uniform(n)
    inv_t, temp = np.float32(1.0 / temperature), np.float32(temperature)
    if spec.discrete:
        return categorical_from_uniform(_softmax32(params[0] * inv_t), u)
    logits, means, log_scales = params
    k = categorical_from_uniform(_softmax32(logits * inv_t), u).astype(np.int64)[:, None]
    eps = noise.normal(n)
    mu = np.take_along_axis(means, k, axis=-1)[:, 0]
    log_s = np.take_along_axis(log_scales, k, axis=-1)[:, 0]
    y = mu + np.exp(log_s) * (eps * temp)
    std, mean = (spec.std[i], spec.mean[i]) if spec.std else (1.0, 0.0)
    return (y * np.float32(std) + np.float32(mean)).astype(np.float32)


class AutoregressiveProgram(Program):
    """Exact log-likelihood in one ``logits`` call; sampling in D steps.

    With a ``step`` graph (x_prev, *state, t -> parameters of position t, *state_next) sampling carries the
    state, zeros at the start, shaped as the manifest declares it (an RNN's hidden state, a Transformer's
    key/value cache), so no step re-reads the prefix; ``recompute=True`` re-reads the prefix with ``logits``
    instead (the same samples at D times the cost, kept for benchmarks). Without ``step`` every step is one
    ``logits`` call on the partial sample.
    """

    operations = FAMILIES["autoregressive"].operations
    options = (Option("recompute", "sample", bool, default=False,
                      doc="re-read the prefix with logits at every step instead of the step graph (benchmarks)"),)

    def __init__(self, spec: DataSpec, params: dict[str, float],
                 graphs: dict[str, GraphSignature] | None = None) -> None:
        super().__init__(spec, params, graphs)
        self.order = order_name(self.params)
        self.positions = order_positions(spec.shape, self.order).tolist()
        """The natural flat position drawn at each step (0..D-1 for raster)."""

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        x = x.astype(np.float32)
        out = await run("logits", {"x": x})
        return conditional_log_prob(self.spec, flat(x), [out[k] for k in _names(self.spec)]).astype(np.float32)

    async def log_likelihood_terms(self, run: Run, x: np.ndarray, noise: Noise, **options: Any
                                   ) -> tuple[np.ndarray, np.ndarray]:
        """(log p(x) (N,), -log p(x_i | x_<i) (N, D) nats) from one ``logits`` call: the chain rule's exact
        terms of the model's order (``positions``), each at its natural position (row-major over the data
        shape), summing to -log p(x)."""
        x = x.astype(np.float32)
        out = await run("logits", {"x": x})
        params = [out[k] for k in _names(self.spec)]
        # log p(x) as log_likelihood computes it, so asking for the terms does not change the score
        lp = conditional_log_prob(self.spec, flat(x), params).astype(np.float32)
        return lp, -conditional_terms(self.spec, flat(x), params)

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, recompute: bool = False,
                     **options: Any) -> SampleResult:
        if recompute or "step" not in self.graphs:
            return SampleResult(await self._sample_by_prefix(run, n, noise, temperature))
        return SampleResult(await self._sample_by_step(run, n, noise, temperature))

    async def _sample_by_prefix(self, run: Run, n: int, noise: Noise, temperature: float) -> np.ndarray:
        spec, names = self.spec, _names(self.spec)
        x = np.zeros((n, spec.dim), dtype=np.float32)
        for i in self.positions:
            out = await run("logits", {"x": x.reshape(n, *spec.shape)})
            x[:, i] = draw_position(spec, i, [out[k][:, i] for k in names], noise, temperature)
        return spec.postprocess(x.reshape(n, *spec.shape))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The step graph's state inputs and their shapes without the batch axis."""
        sig = self.graphs["step"]
        return {k: tuple(int(d) for d in shape[1:]) for k, shape in sig.inputs.items() if k not in ("x_prev", "t")}

    async def _sample_by_step(self, run: Run, n: int, noise: Noise, temperature: float) -> np.ndarray:
        spec, names = self.spec, _names(self.spec)
        x = np.zeros((n, spec.dim), dtype=np.float32)
        state = {k: np.zeros((n, *shape), dtype=np.float32) for k, shape in self.state_shapes().items()}
        prev = np.zeros((n, 1), dtype=np.float32)  # ignored at t = 0, where the graph reads its start token
        for t, i in enumerate(self.positions):
            out = await run("step", {"x_prev": prev, **state, "t": np.full((n, 1), t, dtype=np.float32)})
            x[:, i] = draw_position(spec, i, [out[k].reshape(n, -1) for k in names], noise, temperature)
            state = {k: out[f"{k}_next"] for k in state}
            prev = x[:, i:i + 1].copy()
        return spec.postprocess(x.reshape(n, *spec.shape))
