"""pPCA served from its graphs: ``log_prob`` (x[, u]), ``encoder`` (x -> z), ``generator`` (z, eps -> x)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.server.programs.base import GraphSignature, Option, Program, Run, SampleResult, dequantised_log_prob


class PPCAProgram(Program):
    operations = FAMILIES["linear_gaussian"].operations
    options = (Option("draws", "log_likelihood", int, 1, 4096, "dequant_draws",
                      "uniform dequantisation draws of the log-mean-exp bound (discrete data only)"),
               Option("sample", "decode", bool, default=False, doc="draw from p(x|z) instead of its mean"))

    def __init__(self, spec: DataSpec, params: dict[str, float], graphs: dict[str, GraphSignature] | None = None
                 ) -> None:
        super().__init__(spec, params, graphs)
        if not spec.discrete:  # continuous data are scored exactly: there is nothing to draw
            self.options = tuple(o for o in self.options if o.name != "draws")

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, draws: int | None = None,
                             **options: Any) -> np.ndarray:
        x = x.astype(np.float32)
        if not self.spec.discrete:
            return (await run("log_prob", {"x": x}))["log_prob"]
        draws = int(draws or self.param("dequant_draws"))
        # same draw order as training.ppca.PPCA.log_prob, all draws in one submission
        return await dequantised_log_prob(run, "log_prob", x, noise, self.spec.dim, draws)

    async def log_likelihood_terms(self, run: Run, x: np.ndarray, noise: Noise, draws: int | None = None,
                                   **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """(log_likelihood's answer (N,), its exact chain-rule terms -log p(x_i | x_<i) (N, D) nats).

        The marginal is Gaussian, x ~ N(m, C) with C = W W^T + diag(s^2) in raw units, so with C = L L^T
        (Cholesky) and v = L^-1 (x - m), -log p(x) = sum_i [v_i^2 / 2 + log L_ii + log(2 pi) / 2]: term i is
        -log p(x_i | x_<i) in the data's order. Discrete data: the served bound is log (1/K) sum_k p(x + u_k)
        over K draws; its terms are the average over the same draws (the request's noise, replayed) of each
        dequantised point's chain-rule terms, weighted by w_k = p(x + u_k) / sum p (the draws that carry the
        bound), plus an equal share of the gap sum_k w_k log(K w_k) >= 0 between that average and the bound,
        so they sum to -log_prob up to float32 rounding: term i says how unlikely the cell of x_i is given
        the cells before it.
        """
        lp = await self.log_likelihood(run, x, noise, draws=draws, **options)
        m, inv_l, log_diag = await self._chain(run)
        n, dim = x.shape[0], self.spec.dim
        flat_x = x.reshape(n, dim).astype(np.float64)
        const = log_diag + 0.5 * np.log(2 * np.pi)
        if not self.spec.discrete:
            v = (flat_x - m) @ inv_l.T
            return lp, 0.5 * v * v + const
        draws = int(draws or self.param("dequant_draws"))
        replay = Noise(noise.seed)
        per_draw = []  # chain-rule terms of each dequantised point, the draws dequantised_log_prob made
        for _ in range(draws):
            v = (flat_x + replay.uniform(n, dim) - 0.5 - m) @ inv_l.T
            per_draw.append(0.5 * v * v + const)
        t = np.stack(per_draw)  # (K, N, D)
        log_p = -t.sum(axis=2)  # (K, N): log p(x + u_k)
        w = np.exp(log_p - log_p.max(axis=0))
        w /= w.sum(axis=0)
        terms = (w[..., None] * t).sum(axis=0)
        # -log mean_k p_k = sum_k w_k (-log p_k) + KL(w || uniform): the gap (in [0, log K]) shared evenly
        gap = (w * np.log(np.maximum(w * draws, 1e-300))).sum(axis=0)
        return lp, terms + gap[:, None] / dim

    async def _chain(self, run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(m (D,), L^-1 (D, D), log diag L (D,)) of the marginal N(m, C), read off the ``generator`` graph
        (x = W z + m + s * eps, linear in z and eps): one call on the rows z = 0, e_j and eps = e_i. Kept per
        loaded model; float64."""
        if getattr(self, "_chain_cache", None) is None:
            q, dim = int(self.param("latent_dim")), self.spec.dim
            z = np.zeros((1 + q + dim, q), dtype=np.float32)
            eps = np.zeros((1 + q + dim, dim), dtype=np.float32)
            z[1:1 + q] = np.eye(q, dtype=np.float32)
            eps[1 + q:] = np.eye(dim, dtype=np.float32)
            out = (await run("generator", {"z": z, "eps": eps}))["x"].reshape(1 + q + dim, dim).astype(np.float64)
            m = out[0]
            w = (out[1:1 + q] - m).T  # (D, q)
            s = np.diag(out[1 + q:] - m)  # (D,): the noise scale of each dimension, raw units
            chol = np.linalg.cholesky(w @ w.T + np.diag(s * s))
            self._chain_cache = (m, np.linalg.inv(chol), np.log(np.diag(chol)))
        return self._chain_cache

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        q = int(self.param("latent_dim"))
        z = noise.normal(n, q) * np.float32(temperature)
        eps = noise.normal(n, self.spec.dim) * np.float32(temperature)
        x = (await run("generator", {"z": z, "eps": eps}))["x"]
        return SampleResult(self.spec.postprocess(x), z)

    async def encode(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        return (await run("encoder", {"x": x.astype(np.float32)}))["z"]

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, sample: bool = False,
                     **options: Any) -> np.ndarray:
        """The mean W z + mu; with ``sample`` a draw from p(x|z) = N(W z + mu, sigma^2 I), eps =
        noise.normal(N, D). In the data domain either way (discrete data rounded and clipped to the levels)."""
        n = z.shape[0]
        eps = noise.normal(n, self.spec.dim) if sample else np.zeros((n, self.spec.dim), dtype=np.float32)
        x = (await run("generator", {"z": z.astype(np.float32), "eps": eps}))["x"]
        return self.spec.postprocess(x)
