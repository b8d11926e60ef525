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
                      "uniform dequantisation draws averaged in the bound (discrete data only)"),
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
