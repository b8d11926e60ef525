"""GAN served from its ``generator`` graph (z -> x in raw data units, before rounding)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve.core.families import FAMILIES
from genserve.core.noise import Noise
from genserve.server.programs.base import Program, Run, SampleResult


class GANProgram(Program):
    """Sample and decode; a GAN has no likelihood and no encoder."""

    operations = FAMILIES["implicit"].operations

    async def sample(self, run: Run, n: int, noise: Noise, temperature: float = 1.0, **options: Any) -> SampleResult:
        """Noise order as ``training.gan.GAN.sample``: z = noise.normal(n, latent_dim) * temperature."""
        z = noise.normal(n, int(self.param("latent_dim"))) * np.float32(temperature)
        x = (await run("generator", {"z": z}))["x"]
        return SampleResult(self.spec.postprocess(x), z)

    async def decode(self, run: Run, z: np.ndarray, noise: Noise, **options: Any) -> np.ndarray:
        q = int(self.param("latent_dim"))
        if z.ndim != 2 or z.shape[1] != q:
            raise ValueError(f"z has shape {tuple(z.shape)} but this generator needs (N, {q})")
        x = (await run("generator", {"z": z.astype(np.float32)}))["x"]
        return self.spec.postprocess(x)
