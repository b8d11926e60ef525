"""RealNVP served from its graphs: ``forward`` (x[, u] -> z, log_prob) and ``inverse`` (z -> x)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.noise import Noise
from genserve.server.programs.base import Program, Run, SampleResult, dequantised_log_prob, flat


class RealNVPProgram(Program):
    """The operations of ``genserve.training.realnvp.RealNVP``, drawing noise in the same order."""

    operations = ("sample", "log_likelihood", "encode", "decode")

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, draws: int | None = None,
                             **options: Any) -> np.ndarray:
        """Continuous: exact log p(x). Discrete: mean over ``draws`` of log p(x + u), u = noise.uniform(N, D)
        per draw (a lower bound on log P(x)); nats per row, shape (N,)."""
        x = x.astype(np.float32)
        if not self.spec.discrete:
            return (await run("forward", {"x": x}))["log_prob"]
        draws = int(draws or self.param("dequant_draws"))
        # same draw order as training.realnvp.RealNVP.log_prob, all draws in one submission
        return await dequantised_log_prob(run, "forward", x, noise, self.spec.dim, draws)

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        z = noise.normal(n, self.spec.dim) * np.float32(temperature)
        x = (await run("inverse", {"z": z}))["x"]
        return SampleResult(self.spec.postprocess(x), z)

    async def encode(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """z = f(x); discrete x at the centre of its cell (u = 1/2), so decoding gives x back."""
        x = x.astype(np.float32)
        feeds = {"x": x}
        if self.spec.discrete:
            feeds["u"] = np.full_like(flat(x), 0.5)
        return (await run("forward", feeds))["z"]

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        x = (await run("inverse", {"z": z.astype(np.float32)}))["x"]
        return self.spec.postprocess(x)
