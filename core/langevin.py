"""The constants of one raw-unit Langevin step, shared by training (PyTorch) and serving (numpy) bit for bit."""

from __future__ import annotations

import math

import numpy as np

from genserve.core.spec import DataSpec


def langevin_constants(spec: DataSpec, step_size: float, noise_scale: float, temperature: float,
                       box: float) -> dict[str, np.ndarray]:
    """Per-feature float32 constants of the raw-unit Langevin step, each of shape (D,).

    x = a y + b maps model space to raw units; a step is x <- clip(x - drift * dE/dx + diffusion * eps, low,
    high) with drift = eta a^2 and diffusion = a sqrt(2 eta) tau T. Computed in float64 then rounded once, so
    PyTorch training and the serving program use identical float32 values.

    Example:
        >>> c = langevin_constants(DataSpec("digits", (8, 8), "discrete", levels=17), 0.01, 1.0, 1.0, 4.0)
        >>> float(c["a"][0]), float(c["low"][0]), float(c["high"][0])
        (17.0, -0.5, 16.5)
    """
    D = spec.dim
    if spec.discrete:
        a, b = np.full(D, float(spec.levels)), np.full(D, -0.5)
        y_low, y_high = 0.0, 1.0
    else:
        a, b = np.asarray(spec.std or [1.0] * D, np.float64), np.asarray(spec.mean or [0.0] * D, np.float64)
        y_low, y_high = -box, box
    diffusion = a * math.sqrt(2 * step_size) * noise_scale * temperature
    c = {"a": a, "b": b, "drift": step_size * a**2, "diffusion": diffusion,
         "low": a * y_low + b, "high": a * y_high + b}
    return {k: v.astype(np.float32) for k, v in c.items()}
