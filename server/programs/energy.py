"""Energy-based model served from its graphs: ``energy`` (x -> E) and ``energy_grad`` (x -> E, dE/dx).

log-likelihood is -E(x), unnormalised (log Z is unknown). Sampling is Langevin dynamics in raw data units,
one ``energy_grad`` call per step, with the same float32 arithmetic and noise order as
``training.ebm.EnergyModel.sample`` so that the same seed gives the same chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.langevin import langevin_constants
from genserve.core.noise import Noise
from genserve.server.programs.base import MOST_STEPS, Option, Program, Run, SampleResult, flat

MOST_SCALE = 1e3
"""The largest Langevin step size or noise scale a request or a manifest default may give (a fuzzed default of
1e300 overflowed the chain's float32 values to infinity at the first step)."""


class EnergyProgram(Program):
    """Unnormalised log-likelihood and Langevin sampling; options ``langevin_steps``, ``langevin_step_size``,
    ``langevin_noise`` (defaults from the manifest's parameters)."""

    operations = FAMILIES["energy"].operations
    options = (Option("langevin_steps", "sample", int, 1, MOST_STEPS, "langevin_steps", "Langevin steps per chain"),
               Option("langevin_step_size", "sample", float, 0.0, MOST_SCALE, "langevin_step_size", "step size eta",
                      open_low=True),
               Option("langevin_noise", "sample", float, 0.0, MOST_SCALE, "langevin_noise", "noise scale tau"))

    async def log_likelihood(self, run: Run, x: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        """-E(x) in nats per row (N,), unnormalised; integer images are scored at the centres of their cells."""
        return -(await run("energy", {"x": x.astype(np.float32)}))["energy"]

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0,
                     langevin_steps: int | None = None, langevin_step_size: float | None = None,
                     langevin_noise: float | None = None, **options: Any) -> SampleResult:
        """Noise order: init = noise.uniform(n, D) (levels) or noise.normal(n, D) (rows), then one
        noise.normal(n, D) per step."""
        steps = int(self.param("langevin_steps") if langevin_steps is None else langevin_steps)
        step_size = float(self.param("langevin_step_size") if langevin_step_size is None else langevin_step_size)
        tau = float(self.param("langevin_noise") if langevin_noise is None else langevin_noise)
        if steps < 0 or step_size <= 0 or tau < 0:
            raise ValueError(f"need langevin_steps >= 0, langevin_step_size > 0, langevin_noise >= 0; "
                             f"got {steps}, {step_size}, {tau}")
        c = langevin_constants(self.spec, step_size, tau, float(temperature), float(self.param("box")))
        D, shape = self.spec.dim, self.spec.shape
        init = noise.uniform(n, D) if self.spec.discrete else noise.normal(n, D)
        x = init * c["a"] + c["b"]
        for _ in range(steps):  # the float32 operations of training.ebm.langevin, in its order
            g = flat((await run("energy_grad", {"x": x.reshape(n, *shape)}))["grad"])
            eps = noise.normal(n, D)
            x = x - c["drift"] * g + c["diffusion"] * eps
            x = np.minimum(np.maximum(x, c["low"]), c["high"])
        return SampleResult(self.spec.postprocess(x.reshape(n, *shape)))
