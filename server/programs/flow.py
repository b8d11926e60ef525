"""Flows served from their graphs: ``forward`` (x[, u] -> z, log_prob) and ``inverse`` (z -> x), or, for flows
whose inverse is a fixed-point loop (MAF), ``inverse_pass_k`` (y, x -> x_next) run ``inverse_passes_k`` times
per stage k, each pass one batched graph call, so concurrent requests share the passes as AR steps do."""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.noise import Noise
from genserve.core.spec import DataSpec
from genserve.server.programs.base import (
    MOST_STEPS,
    GraphSignature,
    Option,
    Program,
    Run,
    SampleResult,
    dequantised_log_prob,
    flat,
)


class FlowProgram(Program):
    """The flow family's operations, drawing noise in the order of ``genserve.training.realnvp.RealNVP``."""

    operations = FAMILIES["flow"].operations
    options = (Option("draws", "log_likelihood", int, 1, 4096, "dequant_draws",
                      "uniform dequantisation draws K of the log-mean-exp bound (discrete data only; more: "
                      "tighter and slower)"),)

    def __init__(self, spec: DataSpec, params: dict[str, float], graphs: dict[str, GraphSignature] | None = None
                 ) -> None:
        super().__init__(spec, params, graphs)
        if "inverse_stages" in self.params:  # an iterative inverse: loop counts, each checked once here
            staged = sum(1 for g in self.graphs if g.startswith("inverse_pass_"))
            stages = self.whole("inverse_stages", 1, staged or 64)
            if staged and stages != staged:
                raise ValueError(f"manifest parameter 'inverse_stages' is {stages}, but the manifest lists {staged} "
                                 "inverse_pass_k graphs; re-export the model")
            for k in range(stages):
                self.whole(f"inverse_passes_{k}", 1, MOST_STEPS)
        if not spec.discrete:  # continuous data are scored exactly: there is nothing to draw
            self.options = ()

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, draws: int | None = None,
                             **options: Any) -> np.ndarray:
        """Continuous: exact log p(x). Discrete: log (1/K) sum_k p(x + u_k), K = ``draws``, u_k =
        noise.uniform(N, D) per draw (a lower bound on log P(x) that tightens with K); nats per row, (N,)."""
        x = x.astype(np.float32, copy=False)  # the engine checked and copied it
        if not self.spec.discrete:
            return (await run("forward", {"x": x}))["log_prob"]
        draws = int(draws or self.param("dequant_draws"))
        # same draw order as training.realnvp.RealNVP.log_prob, all draws in one submission
        return await dequantised_log_prob(run, "forward", x, noise, self.spec.dim, draws)

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        z = noise.normal(n, self.spec.dim) * np.float32(temperature)
        return SampleResult(await self._invert(run, z), z)

    async def encode(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """z = f(x); discrete x at the centre of its cell (u = 1/2), so decoding gives x back."""
        x = x.astype(np.float32, copy=False)
        feeds = {"x": x}
        if self.spec.discrete:
            feeds["u"] = np.full_like(flat(x), 0.5)
        return (await run("forward", feeds))["z"]

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        return await self._invert(run, z.astype(np.float32))

    async def _invert(self, run: Run, z: np.ndarray) -> np.ndarray:
        """x = f^-1(z) in the data domain: discrete data get the integer cell of the dequantised value."""
        if "inverse_pass_0" in self.graphs or "inverse" not in self.graphs and "inverse_stages" in self.params:
            y = z
            for k in range(int(self.param("inverse_stages"))):
                x = np.zeros_like(y)
                for _ in range(int(self.param(f"inverse_passes_{k}"))):
                    x = (await run(f"inverse_pass_{k}", {"y": y, "x": x}))["x_next"]
                y = x
        else:
            y = (await run("inverse", {"z": z}))["x"]
        y = y.reshape(len(z), *self.spec.shape)
        return self.spec.postprocess(y - np.float32(0.5) if self.spec.discrete else y)
