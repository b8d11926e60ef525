"""Seeded noise streams: the one source of randomness for sampling, in PyTorch and in serving alike.

Graphs are deterministic; every random draw (latents, uniforms for categorical sampling, Langevin noise,
dequantisation) comes from a ``Noise`` stream in a documented order, so the same seed gives the same samples
in PyTorch, in ONNX Runtime, alone or batched with other requests.
"""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**63 - 1
"""Seeds are 0..2**63-1: what Noise takes, a genserve.v1 request carries and an OIP int64 parameter holds."""


def derived_seed(seed: int, index: int) -> int:
    """The seed of part ``index`` of a job seeded ``seed``; part 0 keeps the seed itself.

    Client and server derive the same seeds this way, e.g. the chunks of a streamed score (index: the chunk's
    first row) and the blocks of a sample stream (index: the block number), so each part has its own noise
    stream, reproducible from (seed, index).

    Examples:
        >>> derived_seed(7, 0)
        7
        >>> derived_seed(7, 4096) == derived_seed(7, 4096) != derived_seed(8, 4096)
        True
    """
    if index == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & MAX_SEED


class Noise:
    """A per-request stream of float32 draws from NumPy's PCG64 generator.

    Example:
        >>> a, b = Noise(7), Noise(7)
        >>> bool((a.normal(2, 3) == b.normal(2, 3)).all())
        True
    """

    def __init__(self, seed: int) -> None:
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {seed}")
        self.seed = int(seed)
        self._generator: np.random.Generator | None = None

    @property
    def _rng(self) -> np.random.Generator:
        # Made at the first draw: most requests of a deterministic operation (Encode, an exact likelihood)
        # never draw, and a PCG64 costs ~15 us to seed.
        if self._generator is None:
            self._generator = np.random.Generator(np.random.PCG64(self.seed))
        return self._generator

    def normal(self, *shape: int) -> np.ndarray:
        """Standard normal draws of the given shape, float32."""
        return self._rng.standard_normal(shape, dtype=np.float32)

    def uniform(self, *shape: int) -> np.ndarray:
        """Uniform draws in [0, 1), float32."""
        return self._rng.random(shape, dtype=np.float32)


def categorical_from_uniform(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: index of the first level whose cumulative probability exceeds ``u``.

    ``probs`` (..., K) rows summing to 1, ``u`` (...) uniforms; returns float32 levels in 0..K-1. The same
    rule in PyTorch (``training.base.categorical_from_uniform``) gives identical draws.
    """
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64), axis=-1)  # float64: torch and numpy agree at edges
    idx = (cdf < u[..., None]).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.float32)
